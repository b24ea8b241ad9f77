//! Lists page: `limit` and each page's `next_cursor` walk a whole list, every item once, in the
//! list's order, and the last page says it is the last. A cursor not of the list's kind (an
//! id, a version) is a `400`, never a `500`.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

const PLATFORM_KEY: &str = "platform-admin-key-for-tests";

/// `path` on the mesh's API, with `query`.
fn url(tm: &TestMesh, path: &str, query: &[(&str, &str)]) -> reqwest::Url {
    reqwest::Url::parse_with_params(&format!("{}{path}", tm.api), query).unwrap()
}

/// Answers `GET path` with `query`, which must be `200`.
async fn page(tm: &TestMesh, key: &str, path: &str, query: &[(&str, &str)]) -> Value {
    let res = tm.http.get(url(tm, path, query)).bearer_auth(key).send().await.unwrap();
    assert_eq!(res.status(), 200, "{path} {query:?}");
    res.json().await.unwrap()
}

/// The items of `path`, two a page, following each page's `next_cursor` to the end.
async fn walk(tm: &TestMesh, key: &str, path: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..50 {
        let mut query = vec![("limit", "2")];
        query.extend(cursor.as_deref().map(|c| ("cursor", c)));
        let answer = page(tm, key, path, &query).await;
        let got = answer["items"].as_array().unwrap_or_else(|| panic!("{path}: {answer}"));
        assert!(got.len() <= 2, "{path}: a page of two: {answer}");
        items.extend(got.iter().cloned());
        cursor = match &answer["next_cursor"] {
            Value::Null => return items,
            next => {
                assert_eq!(got.len(), 2, "{path}: a page with a next one is full: {answer}");
                Some(next.as_str().map_or_else(|| next.to_string(), str::to_string))
            }
        };
    }
    panic!("{path}: still paging after 50 pages")
}

/// Each of `field`'s values in `items`.
fn values(items: &[Value], field: &str) -> Vec<String> {
    items.iter().map(|i| i[field].as_str().map_or_else(|| i[field].to_string(), str::to_string)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_list_pages_through_all_it_holds_once_each_in_order() {
    let tm = spawn_with(&Svc::ALL, |s| s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY))).await;
    let send = |method: Method, path: String, body: Value| {
        let req = tm.http.request(method, format!("{}{path}", tm.api)).json(&body);
        let key = if path == "/v1/tenants" { PLATFORM_KEY } else { tm.key.as_str() };
        async move {
            let res = req.bearer_auth(key).send().await.unwrap();
            assert!(res.status().is_success(), "{path}: {}", res.status());
        }
    };
    // Five of everything (the tenant's admin key is one of its five keys), and five versions of
    // one workflow; made in an order that is not the lists' own, where a list is by name.
    let wf = |name: &str| json!({"name": name, "steps": [{"id": "a", "uses": "noop"}]});
    for n in ["E", "B", "D", "A", "C"] {
        send(Method::PUT, format!("/v1/secrets/SECRET_{n}"), json!({"value": "x"})).await;
        send(Method::PUT, format!("/v1/workflows/wf-{}", n.to_lowercase()), wf(&format!("wf-{}", n.to_lowercase())))
            .await;
        send(Method::PUT, "/v1/workflows/versioned".into(), wf("versioned")).await;
        send(Method::POST, "/v1/schedules".into(), json!({"cron": "0 0 1 1 *", "workflow": "versioned"})).await;
        send(Method::POST, "/v1/webhook-endpoints".into(), json!({"url": format!("http://127.0.0.1:9/{n}")})).await;
        let repo =
            json!({"forge": "github", "repository": format!("o/{n}"), "secret": "12345678", "workflow": wf("r")});
        send(Method::POST, "/v1/repo-connections".into(), repo).await;
        send(Method::POST, "/v1/tenants".into(), json!({"id": format!("tenant-{}", n.to_lowercase()), "name": n}))
            .await;
        if n != "C" {
            send(Method::POST, "/v1/keys".into(), json!({"role": "viewer", "name": n})).await;
        }
    }
    tm.wait_projected().await;

    // (path, the key that may list it, the field that tells items apart, how many it holds)
    let lists = [
        ("/v1/secrets", tm.key.as_str(), "name", 5),
        ("/v1/workflows", tm.key.as_str(), "name", 6),
        ("/v1/workflows/versioned/versions", tm.key.as_str(), "version", 5),
        ("/v1/schedules", tm.key.as_str(), "id", 5),
        ("/v1/webhook-endpoints", tm.key.as_str(), "id", 5),
        ("/v1/repo-connections", tm.key.as_str(), "id", 5),
        ("/v1/keys", tm.key.as_str(), "id", 5),
        // `default` and the five made here.
        ("/v1/tenants", PLATFORM_KEY, "id", 6),
    ];
    let mut walks = std::collections::HashMap::new();
    for (path, key, field, count) in lists {
        let items = walk(&tm, key, path).await;
        let walked = values(&items, field);
        let whole = page(&tm, key, path, &[("limit", "200")]).await;
        assert!(whole["next_cursor"].is_null(), "{path}: {whole}");
        let whole = values(whole["items"].as_array().unwrap(), field);
        assert_eq!(walked, whole, "{path}: two a page, the same items in the same order as one page");
        assert_eq!(walked.len(), count, "{path}: {walked:?}");
        // The default page (50) holds them all too.
        assert_eq!(values(page(&tm, key, path, &[]).await["items"].as_array().unwrap(), field), whole, "{path}");
        walks.insert(path, items);
    }
    // The lists' orders: names ascending, versions and schedules newest first, ids oldest first.
    let walked = |path: &str, field: &str| values(&walks[path], field);
    assert_eq!(walked("/v1/secrets", "name"), ["SECRET_A", "SECRET_B", "SECRET_C", "SECRET_D", "SECRET_E"]);
    assert_eq!(walked("/v1/workflows", "name"), ["versioned", "wf-a", "wf-b", "wf-c", "wf-d", "wf-e"]);
    assert_eq!(walked("/v1/workflows/versioned/versions", "version"), ["5", "4", "3", "2", "1"]);
    let urls = ["E", "B", "D", "A", "C"].map(|n| format!("http://127.0.0.1:9/{n}"));
    assert_eq!(walked("/v1/webhook-endpoints", "url"), urls, "oldest first");
    let schedules: Vec<_> = walks["/v1/schedules"].iter().map(|s| ts(s, "created_at")).collect();
    assert!(schedules.is_sorted_by(|a, b| a >= b), "newest first: {schedules:?}");
    let keys = walked("/v1/keys", "name");
    assert_eq!(keys[1..], ["E", "B", "D", "A"], "oldest first, after the tenant's first key");
    let repositories = ["E", "B", "D", "A", "C"].map(|n| format!("o/{n}"));
    assert_eq!(walked("/v1/repo-connections", "repository"), repositories, "oldest first");
    let tenants = ["default", "tenant-a", "tenant-b", "tenant-c", "tenant-d", "tenant-e"];
    assert_eq!(walked("/v1/tenants", "id"), tenants, "by id");

    // A cursor a list did not give, a limit out of range or an unknown parameter: a 400
    // problem, whatever the list.
    let long = "A".repeat(257);
    let bad: [(&str, &[(&str, &str)]); 8] = [
        ("/v1/schedules", &[("cursor", "not-an-id")]),
        ("/v1/keys", &[("cursor", "7")]),
        ("/v1/workflows/versioned/versions", &[("cursor", "newest")]),
        ("/v1/secrets", &[("limit", "0")]),
        ("/v1/repo-connections", &[("limit", "201")]),
        ("/v1/webhook-endpoints", &[("page", "2")]),
        // (Postgres refuses a text with a NUL: the gateway must refuse it first.)
        ("/v1/secrets", &[("cursor", "A\u{0}")]),
        ("/v1/workflows", &[("cursor", &long)]),
    ];
    for (path, query) in bad {
        let res = tm.http.get(url(&tm, path, query)).bearer_auth(&tm.key).send().await.unwrap();
        assert_eq!(res.status(), 400, "{path} {query:?}");
        assert_eq!(res.headers()["content-type"], "application/problem+json", "{path} {query:?}");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["type"], "https://taskmesh.dev/problems/bad-request", "{path} {query:?}: {problem}");
    }
    // A list by name starts after any name given (one it never held too); one past the last is
    // an empty last page, not an error.
    let after = page(&tm, &tm.key, "/v1/secrets", &[("cursor", "SECRET_BB")]).await;
    assert_eq!(values(after["items"].as_array().unwrap(), "name"), ["SECRET_C", "SECRET_D", "SECRET_E"]);
    let past = page(&tm, &tm.key, "/v1/secrets", &[("cursor", "ZZZ")]).await;
    assert_eq!((past["items"].clone(), past["next_cursor"].clone()), (json!([]), Value::Null));
    // A stored workflow's versions after its first are an empty page; a workflow never stored
    // is a 404, cursor or not.
    let after_first = page(&tm, &tm.key, "/v1/workflows/versioned/versions", &[("cursor", "1")]).await;
    assert_eq!((after_first["items"].clone(), after_first["next_cursor"].clone()), (json!([]), Value::Null));
    for query in [&[][..], &[("cursor", "3")][..]] {
        let res =
            tm.http.get(url(&tm, "/v1/workflows/never/versions", query)).bearer_auth(&tm.key).send().await.unwrap();
        assert_eq!(res.status(), 404, "{query:?}");
    }
    tm.finish().await;
}
