//! GitLab: the webhook token and the parts of push and merge request payloads Taskmesh uses.

use axum::http::HeaderMap;
use serde::Deserialize;
use taskmesh_events::ErrorCode;
use taskmesh_http::ApiError;

use crate::{Hook, PullRequest, Push, header};

/// Checks `X-Gitlab-Token`, which is the secret itself, in constant time: the HMACs of the
/// token and of the secret, both keyed with the secret, are compared.
pub fn verify_token(secret: &[u8], token: &str) -> bool {
    let expected = hmac_sha256::HMAC::mac(secret, secret);
    hmac_sha256::HMAC::verify(token.as_bytes(), secret, &expected)
}

/// Verifies a delivery (`X-Gitlab-Token`) and reads what it asks: a `Push Hook` (one run per
/// delivery), or another event. A delivery is named by its `Idempotency-Key` (the same on every
/// retry; GitLab 17.4 and later), else by its `X-Gitlab-Event-UUID`; without either, it is a
/// delivery of its own. Not by its body: two real pushes can have the same (a branch made again
/// at the same commit), and the second must start its run.
pub fn read(headers: &HeaderMap, body: &[u8], secret: &[u8]) -> Result<Hook, ApiError> {
    if !verify_token(secret, header(headers, "x-gitlab-token").unwrap_or("")) {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "X-Gitlab-Token is missing or is not the connection's secret",
        ));
    }
    let delivery = match (header(headers, "idempotency-key"), header(headers, "x-gitlab-event-uuid")) {
        (Some(key), _) => crate::delivery(Some(key), "Idempotency-Key")?,
        (None, Some(event)) => crate::delivery(Some(event), "X-Gitlab-Event-UUID")?,
        (None, None) => uuid::Uuid::now_v7().to_string(),
    };
    match header(headers, "x-gitlab-event").unwrap_or("") {
        // A tag's push comes as an event of its own, in the same shape.
        "Push Hook" | "Tag Push Hook" => {
            let p: PushPayload = taskmesh_http::body::json(body)?;
            // An annotated tag's push names the tag object in `after`; the commit it tags is
            // `checkout_sha` (none when the tag was deleted).
            let commit = match &p.checkout_sha {
                Some(sha) if p.r#ref.starts_with("refs/tags/") && !sha.is_empty() => sha.clone(),
                _ => p.after.clone(),
            };
            let message = p.commits.iter().find(|c| c.id == commit).map(|c| c.message.clone());
            // GitLab lists at most 20 commits, and says how many there were.
            let complete = p.total_commits_count.is_none_or(|n| n <= p.commits.len());
            let files: Vec<crate::CommitFiles> = p.commits.into_iter().map(|c| c.files).collect();
            let mut push = Push::new(p.project.path_with_namespace, p.r#ref, commit, message);
            push.clone_url = p.project.git_http_url;
            push.changed = complete.then(|| crate::changed_files(&files));
            Ok(Hook::Push { delivery, push })
        }
        "Merge Request Hook" => Ok(Hook::PullRequest { delivery, pr: merge_request(body) }),
        other => Ok(Hook::Other(other.to_string())),
    }
}

/// Reads a `Merge Request Hook` payload. Opened, reopened, or updated with new commits (an
/// update says the head it had, `oldrev`, only then), it starts a run; closed or merged, its
/// runs are cancelled.
fn merge_request(body: &[u8]) -> Result<PullRequest, ApiError> {
    let p: MergeRequestPayload = taskmesh_http::body::json(body)?;
    let mr = p.object_attributes;
    let inactive = match (mr.action.as_deref(), &mr.oldrev) {
        (Some("open" | "reopen"), _) | (Some("update"), Some(_)) => None,
        (Some("update"), None) => Some("merge request updated without new commits".to_string()),
        (other, _) => Some(format!(
            "merge request {}: only opened, new commits and reopened start runs",
            other.unwrap_or("event")
        )),
    };
    let fork = mr.source_project_id.is_none() || mr.source_project_id != mr.target_project_id;
    let message = mr.last_commit.as_ref().map(|c| c.message.as_str()).unwrap_or_default();
    Ok(PullRequest {
        repository: p.project.path_with_namespace,
        number: mr.iid,
        head_branch: mr.source_branch,
        target_branch: mr.target_branch,
        commit: mr.last_commit.as_ref().map(|c| c.id.clone()).unwrap_or_default(),
        // The head commit's message is in the payload: `[skip ci]` there counts too.
        title: format!("{}\n{message}", mr.title),
        fork,
        inactive,
        closed: matches!(mr.action.as_deref(), Some("close" | "merge")),
        closed_at: crate::forge_time(mr.updated_at.as_deref()),
        clone_url: p.project.git_http_url,
    })
}

/// A `Merge Request Hook` event (only the fields used).
#[derive(Debug, Deserialize)]
struct MergeRequestPayload {
    project: Project,
    object_attributes: MergeRequest,
}

#[derive(Debug, Deserialize)]
struct MergeRequest {
    iid: u64,
    action: Option<String>,
    source_branch: String,
    target_branch: String,
    #[serde(default)]
    title: String,
    oldrev: Option<String>,
    updated_at: Option<String>,
    last_commit: Option<LastCommit>,
    source_project_id: Option<u64>,
    target_project_id: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct LastCommit {
    id: String,
    #[serde(default)]
    message: String,
}

/// A `Push Hook` event (only the fields used).
#[derive(Debug, Deserialize)]
struct PushPayload {
    r#ref: String,
    after: String,
    checkout_sha: Option<String>,
    project: Project,
    #[serde(default)]
    commits: Vec<Commit>,
    total_commits_count: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct Project {
    path_with_namespace: String,
    git_http_url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Commit {
    id: String,
    #[serde(default)]
    message: String,
    #[serde(flatten)]
    files: crate::CommitFiles,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_annotated_tags_push_names_the_commit_it_tags() {
        let mut headers = HeaderMap::new();
        headers.insert("x-gitlab-token", "s3cret".parse().unwrap());
        headers.insert("x-gitlab-event", "Tag Push Hook".parse().unwrap());
        let body = serde_json::json!({
            "ref": "refs/tags/v1.0", "after": "1111111111111111111111111111111111111111",
            "checkout_sha": "2222222222222222222222222222222222222222",
            "project": {"path_with_namespace": "g/p"},
            "commits": [{"id": "2222222222222222222222222222222222222222", "message": "release [skip ci]"}],
        })
        .to_string();
        let Ok(Hook::Push { push, .. }) = read(&headers, body.as_bytes(), b"s3cret") else { panic!("a push") };
        assert_eq!(push.commit, "2222222222222222222222222222222222222222", "the tagged commit, not the tag object");
        assert_eq!(push.message.as_deref(), Some("release [skip ci]"), "its message found");
    }

    #[test]
    fn the_token_must_be_the_secret() {
        assert!(verify_token(b"a-shared-secret", "a-shared-secret"));
        assert!(!verify_token(b"a-shared-secret", "a-shared-secreT"));
        assert!(!verify_token(b"a-shared-secret", "a-shared-secret "));
        assert!(!verify_token(b"a-shared-secret", ""));
    }
}
