//! GitHub: webhook signatures and the parts of push and pull request payloads Taskmesh uses.

use axum::http::HeaderMap;
use serde::Deserialize;
use taskmesh_events::ErrorCode;
use taskmesh_http::ApiError;

use crate::{Hook, PullRequest, Push, header};

/// Checks `X-Hub-Signature-256` (`sha256=` + hex HMAC-SHA256 of the body) in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> bool {
    header.strip_prefix("sha256=").is_some_and(|hex_sig| crate::verify_hex_hmac(secret, body, hex_sig))
}

/// The signature GitHub would send for `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac_sha256::HMAC::mac(body, secret)))
}

/// Verifies a delivery (`X-Hub-Signature-256`) and reads what it asks: a `push` (one run per
/// `X-GitHub-Delivery`), a `ping`, or another event.
pub fn read(headers: &HeaderMap, body: &[u8], secret: &[u8]) -> Result<Hook, ApiError> {
    if !verify_signature(secret, body, header(headers, "x-hub-signature-256").unwrap_or("")) {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "X-Hub-Signature-256 is missing or does not match the body",
        ));
    }
    let delivery = crate::delivery(header(headers, "x-github-delivery"), "X-GitHub-Delivery")?;
    match header(headers, "x-github-event").unwrap_or("") {
        "ping" => Ok(Hook::Ping),
        "push" => Ok(Hook::Push { delivery, push: push(body, false)? }),
        "pull_request" => Ok(Hook::PullRequest { delivery, pr: pull_request(body) }),
        other => Ok(Hook::Other(other.to_string())),
    }
}

/// A push listing this many commits or more may have left some out (GitHub caps the list).
const MAX_LISTED_COMMITS: usize = 20;

/// Reads a `push` payload: GitHub's, or Gitea's, which has the same fields. Its changed files
/// are taken as complete when GitHub lists fewer than [`MAX_LISTED_COMMITS`], or when Gitea
/// says (`total_commits`, which older versions do not send) that it listed them all.
pub(crate) fn push(body: &[u8], gitea: bool) -> Result<Push, ApiError> {
    let p: PushPayload = taskmesh_http::body::json(body)?;
    let complete = match gitea {
        false => p.commits.len() < MAX_LISTED_COMMITS,
        true => p.total_commits.is_some_and(|n| n <= p.commits.len()),
    };
    // An annotated tag's push names the tag object in `after`; the commit it tags is the head
    // commit's.
    let commit = match &p.head_commit {
        Some(c) if p.r#ref.starts_with("refs/tags/") && !p.deleted && !c.id.is_empty() => c.id.clone(),
        _ => p.after,
    };
    let mut push = Push::new(p.repository.full_name, p.r#ref, commit, p.head_commit.map(|c| c.message));
    push.deleted |= p.deleted;
    push.clone_url = p.repository.clone_url;
    push.changed = complete.then(|| crate::changed_files(&p.commits));
    Ok(push)
}

/// Reads a `pull_request` payload: GitHub's, or Gitea's, which has the same fields. Opened,
/// given new commits (`synchronize`; Gitea: `synchronized`) or reopened, it starts a run;
/// `closed` (merged or not), its runs are cancelled.
pub(crate) fn pull_request(body: &[u8]) -> Result<PullRequest, ApiError> {
    let p: PullRequestPayload = taskmesh_http::body::json(body)?;
    let inactive = match p.action.as_str() {
        "opened" | "synchronize" | "synchronized" | "reopened" => None,
        other => Some(format!("pull request {other}: only opened, new commits and reopened start runs")),
    };
    // The repository's own branch only: the head's repository is the repository itself (by
    // id where the payload has both, else by name), and the head is a branch. A head whose
    // repository is gone (a deleted fork) is not; nor is Gitea's "AGit" request, pushed by
    // anyone who may read the repository to `refs/for/…`, whose head is the repository itself
    // but a ref (`refs/pull/N/head`) rather than a branch.
    let head = &p.pull_request.head;
    let same = head.repo.as_ref().is_some_and(|h| match (h.id, p.repository.id) {
        (Some(a), Some(b)) => a == b,
        _ => h.full_name.eq_ignore_ascii_case(&p.repository.full_name),
    });
    let fork = !same || head.r#ref.starts_with("refs/") || head.r#ref.is_empty();
    Ok(PullRequest {
        repository: p.repository.full_name,
        number: p.number,
        head_branch: p.pull_request.head.r#ref,
        target_branch: p.pull_request.base.r#ref,
        commit: p.pull_request.head.sha,
        title: p.pull_request.title,
        fork,
        inactive,
        closed: p.action == "closed",
        // (`updated_at` is the close's time too, where a forge leaves `closed_at` out.)
        closed_at: crate::forge_time(p.pull_request.closed_at.as_deref().or(p.pull_request.updated_at.as_deref())),
        clone_url: p.repository.clone_url,
    })
}

/// A `pull_request` event (only the fields used).
#[derive(Debug, Deserialize)]
struct PullRequestPayload {
    action: String,
    number: u64,
    pull_request: PullRequestFields,
    repository: Repository,
}

#[derive(Debug, Deserialize)]
struct PullRequestFields {
    #[serde(default)]
    title: String,
    closed_at: Option<String>,
    updated_at: Option<String>,
    head: PullRequestEnd,
    base: PullRequestEnd,
}

/// A pull request's head or base: a branch of a repository, at a commit.
#[derive(Debug, Deserialize)]
struct PullRequestEnd {
    r#ref: String,
    #[serde(default)]
    sha: String,
    repo: Option<RepositoryName>,
}

#[derive(Debug, Deserialize)]
struct RepositoryName {
    full_name: String,
    id: Option<u64>,
}

/// A `push` event (only the fields used).
#[derive(Debug, Deserialize)]
struct PushPayload {
    r#ref: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: Repository,
    head_commit: Option<Commit>,
    #[serde(default)]
    commits: Vec<crate::CommitFiles>,
    /// Gitea's count of the commits pushed.
    total_commits: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct Repository {
    full_name: String,
    clone_url: Option<String>,
    id: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Commit {
    #[serde(default)]
    id: String,
    #[serde(default)]
    message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_annotated_tags_push_names_the_commit_it_tags() {
        let payload = |r#ref: &str| {
            serde_json::json!({
                "ref": r#ref, "after": "1111111111111111111111111111111111111111",
                "repository": {"full_name": "o/r"},
                "head_commit": {"id": "2222222222222222222222222222222222222222", "message": "release"},
            })
            .to_string()
        };
        let tag = push(payload("refs/tags/v1.0").as_bytes(), false).unwrap();
        assert_eq!(tag.commit, "2222222222222222222222222222222222222222", "the tagged commit, not the tag object");
        let branch = push(payload("refs/heads/main").as_bytes(), false).unwrap();
        assert_eq!(branch.commit, "1111111111111111111111111111111111111111", "a branch's push: its `after`");
    }

    #[test]
    fn reproduces_githubs_published_test_vector() {
        // https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
        let secret = b"It's a Secret to Everybody";
        let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(secret, b"Hello, World!"), expected);
        assert!(verify_signature(secret, b"Hello, World!", expected));
        assert!(!verify_signature(secret, b"Hello, World?", expected));
        assert!(!verify_signature(b"wrong", b"Hello, World!", expected));
        assert!(!verify_signature(secret, b"Hello, World!", "sha1=abc"));
        assert!(!verify_signature(secret, b"Hello, World!", ""));
    }
}
