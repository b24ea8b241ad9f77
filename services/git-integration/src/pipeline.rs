//! Pipeline files: a connection's workflow read from its repository at the commit pushed (or a
//! pull request's head),
//! through the forge's API with the connection's token.
//!
//! - GitHub: `GET {api}/repos/{owner}/{name}/contents/{path}?ref={commit}` with
//!   `Accept: application/vnd.github.raw+json`;
//! - GitLab: `GET {api}/api/v4/projects/{project}/repository/files/{path}/raw?ref={commit}`;
//! - Gitea and Forgejo: `GET {api}/api/v1/repos/{owner}/{name}/raw/{path}?ref={commit}`.
//!
//! A forge answers `404` both for a file the commit does not have and for a repository the token
//! cannot see (or an `api_url` that is not the forge's), so a `404` is read as "no such file",
//! and the push starts nothing, only when the forge then shows the commit itself to the same
//! token. The forge not answering within [`FETCH_TIMEOUT`], or answering anything else, is a
//! `503` to the webhook's sender, so that the forge shows the delivery as failed and it can be
//! sent again. It carries no `Retry-After` where the connection must change first: an
//! `api_url` that is no URL, or whose address the egress rules refuse, or a forge refusing the
//! token (`401`, a `403` that is not a rate limit, or `404` for the commit too; just after a
//! push a forge's replica may not show the commit yet, which this reads as lasting too). A
//! forge's rate limit passes its own wait on as `Retry-After` (see [`Refusal::Wait`]); every
//! other `503` (no answer, `429` or `503` without a wait, another `5xx`, any other status)
//! carries `Retry-After: 1`. A file that is not YAML or JSON, or larger than [`MAX_PIPELINE_BYTES`], is a `422`.

use std::time::Duration;

use taskmesh_events::{ErrorCode, Forge};
use taskmesh_http::{ApiError, ApiResult};

/// Largest pipeline file read.
pub const MAX_PIPELINE_BYTES: usize = 1024 * 1024;
/// How long reading a pipeline file may take, all of it: the forge waits for the webhook's
/// answer (Gitea gives it 5 s by default, GitHub and GitLab 10 s).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(4);

/// Where a pipeline file is, and what opens it.
pub(crate) struct Source<'a> {
    pub forge: Forge,
    /// The forge's API base URL.
    pub api_url: &'a str,
    pub repository: &'a str,
    pub path: &'a str,
    pub commit: &'a str,
    pub token: &'a str,
}

/// The URL of a file's raw content at a commit.
pub(crate) fn file_url(src: &Source<'_>) -> Result<url::Url, String> {
    let parts: Vec<&str> = src.path.split('/').collect();
    let mut url = match src.forge {
        Forge::Github => {
            let path: Vec<&str> = std::iter::once("contents").chain(parts.iter().copied()).collect();
            src.forge.repo_api_url(src.api_url, src.repository, &path)?
        }
        Forge::Gitlab => {
            src.forge.repo_api_url(src.api_url, src.repository, &["repository", "files", src.path, "raw"])?
        }
        Forge::Gitea => {
            let path: Vec<&str> = std::iter::once("raw").chain(parts.iter().copied()).collect();
            src.forge.repo_api_url(src.api_url, src.repository, &path)?
        }
    };
    url.query_pairs_mut().append_pair("ref", src.commit);
    Ok(url)
}

/// The URL of the commit itself, at its cheapest: its object only (GitHub's Git database API),
/// without the diff's statistics, files or signature check where the forge would add them.
pub(crate) fn commit_url(src: &Source<'_>) -> Result<url::Url, String> {
    let (path, query): (&[&str], &[(&str, &str)]) = match src.forge {
        Forge::Github => (&["git", "commits", src.commit], &[]),
        Forge::Gitlab => (&["repository", "commits", src.commit], &[("stats", "false")]),
        Forge::Gitea => {
            (&["git", "commits", src.commit], &[("stat", "false"), ("verification", "false"), ("files", "false")])
        }
    };
    let mut url = src.forge.repo_api_url(src.api_url, src.repository, path)?;
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    Ok(url)
}

/// The workflow in the file, as JSON; `None` if the commit has no such file.
pub(crate) async fn fetch(
    http: &reqwest::Client,
    egress: &taskmesh_egress::Egress,
    src: &Source<'_>,
) -> ApiResult<Option<serde_json::Value>> {
    let shown = format!("{} at {}", src.path, src.commit);
    tokio::time::timeout(FETCH_TIMEOUT, read(http, egress, src, &shown)).await.unwrap_or_else(|_| {
        Err(unavailable(format!(
            "reading the pipeline file {shown}: the forge did not answer within {} s",
            FETCH_TIMEOUT.as_secs()
        )))
    })
}

fn unavailable(detail: String) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, detail)
}

/// A `503` that lasts until the connection (its `api_url` or token) or the egress policy is
/// changed: answered without `Retry-After`.
fn misconfigured(detail: String) -> ApiError {
    unavailable(detail).lasting()
}

/// What a forge's answer other than the file tells whoever sent the webhook.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// A rate limit, and how long it asks to be left alone ([`taskmesh_egress::rate_limited`]:
    /// a `403`, `429` or `503` by its headers, or a secondary limit's `403` by its message):
    /// passed on as `Retry-After`.
    Wait(Duration),
    /// The forge refuses the connection's token or does not know its repository, which asking
    /// again will not change: `401`, `404`, and a `403` that is not a rate limit.
    Lasting,
    /// Anything else: try again soon.
    Soon,
}

async fn refusal(res: &mut reqwest::Response) -> Refusal {
    if let Some(wait) = taskmesh_egress::rate_limited(res).await {
        return Refusal::Wait(wait);
    }
    match res.status().as_u16() {
        401 | 403 | 404 => Refusal::Lasting,
        _ => Refusal::Soon,
    }
}

impl Refusal {
    fn answer(self, detail: String) -> ApiError {
        match self {
            Refusal::Wait(wait) => unavailable(detail).retry_after(wait),
            Refusal::Lasting => misconfigured(detail),
            Refusal::Soon => unavailable(detail),
        }
    }
}

async fn read(
    http: &reqwest::Client,
    egress: &taskmesh_egress::Egress,
    src: &Source<'_>,
    shown: &str,
) -> ApiResult<Option<serde_json::Value>> {
    // The egress rules refusing the forge's address (as its name resolves, or at a redirect)
    // last until the connection or the rules change; anything else may pass.
    let failed = |e: reqwest::Error| {
        let detail = format!("reading the pipeline file {shown}: {}", taskmesh_egress::error_chain(&e));
        if taskmesh_egress::is_denied(&e) { misconfigured(detail) } else { unavailable(detail) }
    };
    let get = |url: Result<url::Url, String>, accept: &'static str| {
        let url = url.map_err(|e| misconfigured(format!("the connection's api_url: {e}")));
        let url = url.and_then(|url| {
            egress.check_url(&url).map_err(|d| misconfigured(format!("reading the pipeline file {shown}: {d}")))?;
            Ok(url)
        });
        let (name, value) = src.forge.api_auth(src.token);
        async move { http.get(url?).header(name, value).header("accept", accept).send().await.map_err(failed) }
    };
    let accept = match src.forge {
        Forge::Github => "application/vnd.github.raw+json",
        Forge::Gitlab | Forge::Gitea => "*/*",
    };
    let mut res = get(file_url(src), accept).await?;
    match res.status().as_u16() {
        200 => {}
        // No such file, or no such repository for this token: the commit tells them apart.
        404 => {
            let mut commit = get(commit_url(src), "application/json").await?;
            let code = commit.status().as_u16();
            if code == 200 {
                return Ok(None);
            }
            let detail =
                format!("reading the pipeline file {shown}: the forge answered 404, and {code} for the commit itself");
            return Err(match refusal(&mut commit).await {
                Refusal::Lasting => misconfigured(format!(
                    "{detail}: the connection's token may not see the repository, or its api_url is not the forge's"
                )),
                other => other.answer(detail),
            });
        }
        code => {
            let detail = format!("reading the pipeline file {shown}: the forge answered {code}");
            return Err(refusal(&mut res).await.answer(detail));
        }
    }
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_PIPELINE_BYTES {
            return Err(ApiError::new(
                ErrorCode::InvalidWorkflow,
                format!("the pipeline file {shown} is larger than {MAX_PIPELINE_BYTES} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    parse(&body)
        .map(Some)
        .map_err(|e| ApiError::new(ErrorCode::InvalidWorkflow, format!("the pipeline file {shown}: {e}")))
}

/// A pipeline file's text as JSON: YAML (JSON is YAML too).
pub(crate) fn parse(body: &[u8]) -> Result<serde_json::Value, String> {
    let text = std::str::from_utf8(body).map_err(|_| "is not UTF-8 text".to_string())?;
    let value = taskmesh_events::workflow::yaml_to_json(text).map_err(|e| format!("is not YAML: {e}"))?;
    if !value.is_object() {
        return Err("is not a workflow (a mapping with `name` and `steps`)".into());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(forge: Forge, repository: &'static str, path: &'static str) -> Source<'static> {
        Source { forge, api_url: "https://forge.example/base/", repository, path, commit: "abc123", token: "t" }
    }

    #[tokio::test]
    async fn a_forge_refusing_the_token_lasts_and_a_rate_limit_says_how_long() {
        use axum::response::IntoResponse;
        let answer = |status: u16, headers: &[(&str, &str)], body: &'static str| {
            let mut res = axum::http::Response::builder().status(status);
            for (name, value) in headers {
                res = res.header(*name, *value);
            }
            reqwest::Response::from(res.body(body).unwrap())
        };
        let denied = r#"{"message": "Resource not accessible by personal access token"}"#;
        let secondary = r#"{"message": "You have exceeded a secondary rate limit. Please wait a few minutes."}"#;
        let minute = Refusal::Wait(Duration::from_secs(60));
        for (status, headers, body, refusal_is) in [
            (401, &[][..], "", Refusal::Lasting),
            (404, &[], "", Refusal::Lasting),
            (403, &[("x-ratelimit-remaining", "4999")][..], denied, Refusal::Lasting),
            (403, &[("x-ratelimit-remaining", "0")][..], "", minute),
            (403, &[("retry-after", "42")][..], "", Refusal::Wait(Duration::from_secs(42))),
            (403, &[], secondary, Refusal::Wait(Duration::from_secs(60))),
            (429, &[("retry-after", "7")][..], "", Refusal::Wait(Duration::from_secs(7))),
            (429, &[], "", Refusal::Soon),
            (500, &[], "", Refusal::Soon),
            (502, &[], "", Refusal::Soon),
        ] {
            let mut res = answer(status, headers, body);
            assert_eq!(refusal(&mut res).await, refusal_is, "{status} {headers:?} {body}");
        }
        let waited = Refusal::Wait(Duration::from_secs(42)).answer("rate limited".into()).into_response();
        assert_eq!(waited.status(), 503);
        assert_eq!(waited.headers()["retry-after"], "42");
    }

    #[test]
    fn file_urls_follow_each_forges_api() {
        let url = |s| file_url(&s).unwrap().to_string();
        assert_eq!(
            url(src(Forge::Github, "o/r", "ci/build.yml")),
            "https://forge.example/base/repos/o/r/contents/ci/build.yml?ref=abc123"
        );
        assert_eq!(
            url(src(Forge::Gitlab, "group/sub/p", "ci/build.yml")),
            "https://forge.example/base/api/v4/projects/group%2Fsub%2Fp/repository/files/ci%2Fbuild.yml/raw?ref=abc123"
        );
        assert_eq!(
            url(src(Forge::Gitea, "o/r", ".taskmesh.yml")),
            "https://forge.example/base/api/v1/repos/o/r/raw/.taskmesh.yml?ref=abc123"
        );
        let commit = |s| commit_url(&s).unwrap().to_string();
        assert_eq!(commit(src(Forge::Github, "o/r", "x")), "https://forge.example/base/repos/o/r/git/commits/abc123");
        assert_eq!(
            commit(src(Forge::Gitlab, "group/p", "x")),
            "https://forge.example/base/api/v4/projects/group%2Fp/repository/commits/abc123?stats=false"
        );
        assert_eq!(
            commit(src(Forge::Gitea, "o/r", "x")),
            "https://forge.example/base/api/v1/repos/o/r/git/commits/abc123?stat=false&verification=false&files=false"
        );
        // A name with characters a URL path gives meaning to stays one name.
        assert_eq!(
            url(src(Forge::Github, "o/r", "a b/c?d#e.yml")),
            "https://forge.example/base/repos/o/r/contents/a%20b/c%3Fd%23e.yml?ref=abc123"
        );
    }

    #[test]
    fn a_pipeline_file_is_yaml_or_json_holding_a_mapping() {
        assert_eq!(parse(b"name: ci\nsteps: []\n").unwrap()["name"], "ci");
        assert_eq!(parse(br#"{"name": "ci", "steps": []}"#).unwrap()["name"], "ci");
        assert!(parse(b"- a\n- b\n").unwrap_err().contains("mapping"));
        assert!(parse(b"name: [").unwrap_err().contains("YAML"));
        assert!(parse(&[0xff, 0xfe]).unwrap_err().contains("UTF-8"));
    }
}
