//! The web dashboard at `/ui/`: runs (filtered by status and workflow), a run's DAG, timeline,
//! steps, attempts and logs (cancel, rerun), and the executors with their queues.
//!
//! It is three static files embedded in the binary (no CDN, no build step), served without a
//! key: the page holds no data. The user gives it an API key, kept in the browser tab's
//! `sessionStorage`, and every figure it shows comes from the REST API with that key, so the
//! dashboard sees exactly what the key's role may see. A strict Content-Security-Policy allows
//! nothing but these files and requests to this origin.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::AppState;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

/// Only this origin's files and API; no inline script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/ui/app.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            // Revalidated each time, so an upgraded gateway's files are used at once.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API calls in the dashboard's script: (method, path with each `${…}` as `{}`).
    fn calls() -> Vec<(String, String)> {
        let mut out = Vec::new();
        // How a call starts, and its method when that says it (`act` posts, `remove` deletes).
        let starts = [("api(`", None), ("api(\"", None), ("act(`", Some("post")), ("remove(`", Some("delete"))];
        let found = starts
            .iter()
            .flat_map(|&(start, method)| SCRIPT.match_indices(start).map(move |(i, _)| (i + start.len(), method)));
        for (i, said) in found {
            let rest = &SCRIPT[i..];
            let end = rest.find(['`', '"']).expect("a closed string");
            let (literal, after) = (&rest[..end], &rest[end..]);
            let mut path = String::new();
            let mut depth = 0;
            for c in literal.split('?').next().unwrap().chars() {
                match (c, depth) {
                    ('$', _) => {}
                    ('{', _) => {
                        depth += 1;
                        if depth == 1 {
                            path.push_str("{}");
                        }
                    }
                    ('}', _) => depth -= 1,
                    (c, 0) => path.push(c),
                    _ => {}
                }
            }
            let statement = &after[..after.find(';').unwrap_or(after.len())];
            let method = if let Some(method) = said {
                method
            } else if statement.contains("method: \"POST\"") {
                "post"
            } else if statement.contains("method: \"DELETE\"") {
                "delete"
            } else if statement.contains("method: \"PUT\"") {
                "put"
            } else {
                "get"
            };
            out.push((method.to_string(), path));
        }
        out
    }

    #[test]
    fn the_dashboard_calls_only_operations_the_api_has() {
        let spec = serde_json::to_value(crate::openapi()).unwrap();
        let paths = spec["paths"].as_object().unwrap();
        let calls = calls();
        assert!(calls.len() >= 6, "{calls:?}");
        for (method, path) in &calls {
            let found = paths.iter().any(|(template, ops)| {
                let mut shape = String::new();
                let mut inside = false;
                for c in template.chars() {
                    match c {
                        '{' => {
                            inside = true;
                            shape.push_str("{}");
                        }
                        '}' => inside = false,
                        c if !inside => shape.push(c),
                        _ => {}
                    }
                }
                shape == *path && ops.get(method).is_some()
            });
            assert!(found, "{method} {path} is not an operation of the API");
        }
        for (method, path) in [
            ("get", "/v1/runs"),
            ("get", "/v1/runs/{}/steps/{}/logs"),
            ("post", "/v1/runs/{}/rerun"),
            ("delete", "/v1/keys/{}"),
            ("put", "/v1/secrets/{}"),
        ] {
            assert!(calls.contains(&(method.into(), path.into())), "{method} {path} in {calls:?}");
        }
    }

    #[test]
    fn the_files_are_served_with_a_strict_policy() {
        let res = asset("text/html; charset=utf-8", INDEX);
        let headers = res.headers();
        assert_eq!(headers[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
        // Nothing inline that the policy would have to allow, and nothing from elsewhere.
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style=") && !INDEX.contains("http"));
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("eval("), "data is only ever set as text");
    }
}
