//! `checkout` steps: the run's pushed commit, fetched with the `git` CLI into the step's
//! working directory before the step starts.
//!
//! The commit is fetched by its id, so a branch that moved on since the push does not change
//! what the step sees: by default it alone (`--depth 1`, no tags), or as much of its history
//! as the step's `checkout.depth` asks (0: all) and the repository's tags with `checkout.tags`,
//! into the working directory or the `checkout.path` under it. The connection's token goes
//! with the requests (as an `http.extraHeader` in git's environment, never on a command line
//! or in `.git/config`, so the step's own `git` commands do not have it) only where
//! [`Checkout::token_goes_to`] allows:
//! the connected repository at its forge. git runs as the executor's user, so steps running as
//! `run_as` cannot read the token from its environment; the files are theirs afterwards. The
//! repository's host is judged by the executor's egress rules and git is pinned to the
//! addresses judged (`http.curloptResolve`), redirects are not followed, and git speaks only
//! http(s): the URL comes from a push payload, which whoever holds the connection's webhook
//! secret can write. git and its helpers run in a process group of their own, killed whole
//! when the fetch is given up.

use std::net::IpAddr;
use std::path::Path;
use std::process::Stdio;

use taskmesh_events::Checkout;

/// The `PATH` git runs with.
const GIT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The executor's variables git keeps: how the operator reaches the outside, and whom it trusts.
const PASSED_ON: [&str; 8] = [
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "GIT_SSL_CAINFO",
];
/// Most bytes of git's error output kept in the step's error.
const ERROR_TAIL: usize = 2048;
/// A fetch that receives nothing for this long fails.
const LOW_SPEED_SECS: u64 = 60;

/// Where a step's commit comes from, with what opens it.
#[derive(Clone)]
pub struct Source {
    pub url: url::Url,
    pub commit: String,
    /// The `Authorization` header the fetch sends, when the connection's token goes there.
    auth: Option<String>,
    /// The token, to mask in whatever git says.
    token: Option<String>,
    /// How much history, and whether tags, are fetched.
    options: taskmesh_events::workflow::CheckoutDef,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("url", &self.url.as_str())
            .field("commit", &self.commit)
            .field("authenticated", &self.auth.is_some())
            .finish()
    }
}

impl Source {
    /// `checkout`'s commit, fetched with `token` (the connection's, when it may go to the
    /// repository's URL).
    pub fn new(checkout: &Checkout, token: Option<String>) -> Result<Self, String> {
        let url = url::Url::parse(&checkout.url).map_err(|e| format!("'{}' is not a URL: {e}", checkout.url))?;
        if !matches!(url.scheme(), "http" | "https") || !url.username().is_empty() || url.password().is_some() {
            return Err(format!("'{}' is not an http(s) URL without credentials", checkout.url));
        }
        let commit = checkout.commit.to_ascii_lowercase();
        if !matches!(commit.len(), 40 | 64) || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("'{}' is not a full commit id", checkout.commit));
        }
        let auth = token.as_deref().map(|t| checkout.forge.git_auth(t));
        Ok(Self { url, commit, auth, token, options: Default::default() })
    }

    /// Fetches as much history, and the tags, as the step's `checkout` asks.
    pub fn with_options(mut self, options: taskmesh_events::workflow::CheckoutDef) -> Self {
        self.options = options;
        self
    }

    /// Where under the step's working directory the checkout goes (`None`: the directory itself).
    pub fn path(&self) -> Option<&str> {
        self.options.path.as_deref()
    }

    /// Whether the fetch carries the connection's token.
    pub fn authenticated(&self) -> bool {
        self.auth.is_some()
    }

    fn mask(&self, text: &str) -> String {
        let masks: Vec<String> = self.token.iter().chain(&self.auth).cloned().collect();
        taskmesh_secrets::mask(text, &masks)
    }
}

/// Fetches the commit into `workspace` (an empty directory), or into the step's
/// `checkout.path` under it (made, with the directories above it), and checks it out,
/// detached, with `origin` set to the repository's URL. `run_as`: the user and group the
/// step runs as, who is given the files.
pub async fn fetch(
    source: &Source,
    workspace: &Path,
    egress: &taskmesh_egress::Egress,
    run_as: Option<(u32, u32)>,
) -> Result<(), String> {
    let dir = &match &source.options.path {
        // Checked when the workflow was (plain names, relative), and again here.
        Some(path) => match taskmesh_events::workflow::CheckoutDef::path_problem(path) {
            Some(problem) => return Err(format!("checkout.path: {problem}")),
            None => workspace.join(path),
        },
        None => workspace.to_path_buf(),
    };
    tokio::fs::create_dir_all(dir).await.map_err(|e| format!("making {}: {e}", dir.display()))?;
    let mut config = vec![
        ("http.followRedirects".to_string(), "false".to_string()),
        // A server that stops sending fails the fetch rather than holding it for ever.
        ("http.lowSpeedLimit".to_string(), "1".to_string()),
        ("http.lowSpeedTime".to_string(), LOW_SPEED_SECS.to_string()),
        ("init.defaultBranch".to_string(), "main".to_string()),
        ("advice.detachedHead".to_string(), "false".to_string()),
    ];
    if let Some(pin) = pin(&source.url, egress).await? {
        config.push(("http.curloptResolve".into(), pin));
    }
    if let Some(auth) = &source.auth {
        config.push(("http.extraHeader".into(), format!("Authorization: {auth}")));
    }
    // git runs as the executor, not as the step's user: steps of that user (other tenants'
    // among them) must not find the token in its environment. The files are the step's after.
    let git = |args: &'static [&'static str], extra: Vec<String>| git(source, dir, &config, args, extra);
    git(&["init", "-q"], vec![]).await?;
    git(&["remote", "add", "origin"], vec![source.url.to_string()]).await?;
    let mut fetch = Vec::new();
    if source.options.depth > 0 {
        fetch.push(format!("--depth={}", source.options.depth));
    }
    fetch.push(if source.options.tags { "--tags" } else { "--no-tags" }.to_string());
    fetch.extend(["origin".to_string(), source.commit.clone()]);
    git(&["fetch", "-q"], fetch).await?;
    git(&["checkout", "-q", "--detach", "FETCH_HEAD"], vec![]).await?;
    if let Some((uid, gid)) = run_as {
        let dir = workspace.to_path_buf();
        tokio::task::spawn_blocking(move || give(&dir, uid, gid))
            .await
            .map_err(|e| format!("giving the checkout to uid {uid}: {e}"))?
            .map_err(|e| format!("giving the checkout to uid {uid}: {e}"))?;
    }
    Ok(())
}

/// Gives `path` and everything under it to `uid`:`gid`, following no symbolic link.
fn give(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            give(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// For a URL naming a host: `host:port:addresses` of the addresses it resolves to that egress
/// permits, for `http.curloptResolve`, so git connects to those and no others (a name resolving
/// elsewhere a moment later gains nothing). A URL naming an address is judged as it is.
async fn pin(url: &url::Url, egress: &taskmesh_egress::Egress) -> Result<Option<String>, String> {
    let port = url.port_or_known_default().ok_or("the repository URL has no port")?;
    let host = match url.host() {
        Some(url::Host::Domain(host)) => host.to_string(),
        Some(_) => return egress.check_url(url).map(|()| None).map_err(|e| e.to_string()),
        None => return Err("the repository URL has no host".into()),
    };
    let addrs: Vec<IpAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .map(|a| a.ip())
        .collect();
    let mut denied = None;
    let permitted: Vec<String> = addrs
        .iter()
        .filter(|a| egress.check(**a).map_err(|e| denied = Some(e)).is_ok())
        .map(|a| match a {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        })
        .collect();
    match (permitted.is_empty(), denied) {
        (false, _) => Ok(Some(format!("{host}:{port}:{}", permitted.join(",")))),
        (true, Some(e)) => Err(e.to_string()),
        (true, None) => Err(format!("{host} resolves to no address")),
    }
}

/// Runs `git args extra…` in `dir` with only `config` for configuration, in a process group
/// of its own that is killed whole if this is dropped before it ends (a timeout, a
/// cancellation): git's transport helpers would otherwise outlive it, token and all.
async fn git(
    source: &Source,
    dir: &Path,
    config: &[(String, String)],
    args: &[&str],
    extra: Vec<String>,
) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.args(args)
        .args(extra)
        .current_dir(dir)
        .env_clear()
        .env("PATH", GIT_PATH)
        .env("HOME", dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_ALLOW_PROTOCOL", "http:https")
        .env("GIT_CONFIG_COUNT", config.len().to_string());
    for (i, (key, value)) in config.iter().enumerate() {
        cmd.env(format!("GIT_CONFIG_KEY_{i}"), key).env(format!("GIT_CONFIG_VALUE_{i}"), value);
    }
    for var in PASSED_ON {
        if let Ok(v) = std::env::var(var) {
            cmd.env(var, v);
        }
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("starting git (is it installed on the executor?): {e}"))?;
    let mut group = KillGroup(child.id().map(|p| nix::unistd::Pid::from_raw(p as i32)));
    let out = child.wait_with_output().await.map_err(|e| format!("waiting for git: {e}"))?;
    // It ended (and waited for its helpers): its id may be another's from now on.
    group.0 = None;
    if out.status.success() {
        return Ok(());
    }
    let said = source.mask(String::from_utf8_lossy(&out.stderr).trim());
    let tail = &said[said.floor_char_boundary(said.len().saturating_sub(ERROR_TAIL))..];
    Err(format!("git {} failed ({}): {tail}", args[0], out.status))
}

/// Kills a process group when dropped while armed (git and whatever it started).
struct KillGroup(Option<nix::unistd::Pid>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskmesh_events::Forge;

    fn checkout(url: &str, commit: &str) -> Checkout {
        Checkout {
            forge: Forge::Github,
            connection_id: uuid::Uuid::now_v7(),
            repository: "o/r".into(),
            url: url.into(),
            commit: commit.into(),
        }
    }

    #[test]
    fn only_a_full_commit_id_at_an_http_url_without_credentials_is_fetched() {
        let sha = "fd489864e7642b48eaad6e3f155c10e46810ec72";
        assert!(Source::new(&checkout("https://github.com/o/r.git", sha), None).is_ok());
        assert!(Source::new(&checkout("https://github.com/o/r.git", &sha[..12]), None).is_err());
        assert!(Source::new(&checkout("https://github.com/o/r.git", "main"), None).is_err());
        assert!(Source::new(&checkout("file:///etc", sha), None).is_err());
        assert!(Source::new(&checkout("ssh://git@github.com/o/r.git", sha), None).is_err());
        assert!(Source::new(&checkout("https://u:p@github.com/o/r.git", sha), None).is_err());
    }

    #[test]
    fn what_git_says_never_shows_the_token() {
        let source = Source::new(
            &checkout("https://github.com/o/r.git", "fd489864e7642b48eaad6e3f155c10e46810ec72"),
            Some("ghp_secret".into()),
        )
        .unwrap();
        assert!(source.authenticated());
        let said = source.mask(&format!("fatal: header {} rejected; token ghp_secret", source.auth.clone().unwrap()));
        assert!(!said.contains("ghp_secret") && !said.contains("Basic eC1"), "{said}");
        assert!(!format!("{source:?}").contains("ghp_secret"));
    }

    /// The processes whose environment holds `text`.
    fn holding(text: &str) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.windows(text.len()).any(|w| w == text.as_bytes()))
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_given_up_leaves_no_process_holding_the_token() {
        // A server that takes connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let token = format!("tok-{}", uuid::Uuid::now_v7().simple());
        let url = format!("http://{addr}/o/r.git");
        let source = Source::new(&checkout(&url, &"a".repeat(40)), Some(token.clone())).unwrap();
        let auth = source.auth.clone().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let fetch = tokio::spawn(async move { fetch(&source, &path, &taskmesh_egress::Egress::default(), None).await });
        // git and its transport helper hold the header while they wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while holding(&auth).len() < 2 {
            assert!(std::time::Instant::now() < deadline, "no git process came to hold the header");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Let the helper get to waiting for the server's answer.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        // Given up (a timeout, a cancellation): none of them is left.
        fetch.abort();
        let _ = fetch.await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while !holding(&auth).is_empty() {
            assert!(std::time::Instant::now() < deadline, "left holding the token: {:?}", holding(&auth));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn the_checkout_is_given_to_the_steps_user_without_following_links() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: giving files away needs root");
            return;
        }
        let (dir, outside) = (tempfile::tempdir().unwrap(), tempfile::NamedTempFile::new().unwrap());
        std::fs::create_dir_all(dir.path().join(".git/objects")).unwrap();
        std::fs::write(dir.path().join(".git/objects/x"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        give(dir.path(), 65534, 65534).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        for path in [dir.path().to_path_buf(), dir.path().join(".git/objects/x"), dir.path().join("link")] {
            assert_eq!(std::fs::symlink_metadata(&path).unwrap().uid(), 65534, "{path:?}");
        }
        assert_eq!(std::fs::metadata(outside.path()).unwrap().uid(), 0, "a link's target is not given away");
    }

    #[tokio::test]
    async fn a_repository_at_a_denied_address_is_not_fetched() {
        let egress = taskmesh_egress::Egress::default();
        let metadata = url::Url::parse("http://169.254.169.254/o/r.git").unwrap();
        assert!(pin(&metadata, &egress).await.unwrap_err().contains("denied"));
        let local = url::Url::parse("http://localhost:8080/o/r.git").unwrap();
        let pinned = pin(&local, &egress).await.unwrap().unwrap();
        assert!(pinned.starts_with("localhost:8080:"), "{pinned}");
    }
}
