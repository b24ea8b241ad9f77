//! `checkout` steps: the run's commit (the one pushed, or a pull request's head), fetched with
//! the `git` CLI into the step's working directory before the step starts.
//!
//! The commit is fetched by its id, so a branch that moved on since the push does not change
//! what the step sees: by default it alone (`--depth 1`, no tags), or as much of its history
//! as the step's `checkout.depth` asks (0: all) and the repository's tags with `checkout.tags`,
//! into the working directory or the `checkout.path` under it. The connection's token goes
//! with the requests (as an `http.<url>.extraHeader` in git's environment, never on a command
//! line or in `.git/config`, so the step's own `git` commands do not have it) only where
//! [`Checkout::token_goes_to`] allows, the connected repository at its forge, and only to
//! URLs under the repository's own (submodules: below). git runs as the executor's user, so steps running as
//! `run_as` cannot read the token from its environment; the files are theirs afterwards. The
//! repository's host is judged by the executor's egress rules and git is pinned to the
//! addresses judged (`http.curloptResolve`), redirects are not followed, no hook runs, `HOME`
//! is an empty directory of the executor's, and git speaks only http(s): the URL comes from a
//! push payload, which whoever holds the connection's webhook secret can write. git and its
//! helpers run in a process group of their own, killed whole when the fetch is given up.
//!
//! With `checkout.submodules`, git's own `submodule init` and `update` check out the
//! submodules, level by level (at most [`SUBMODULE_LEVELS`] levels and [`MAX_SUBMODULES`] in
//! all), without the token in git's environment unless the connection names the submodule's
//! repository (below). Each level's gitlink paths must be plain
//! names before git acts on them; git resolves the level's URLs (relative ones against the
//! repository's), and every URL it wrote is read back and checked before anything is fetched:
//! it must be plain http(s) (a host of letters, digits, `-` and `.` as the URL crate writes
//! it, a port, a path of plain names), so the URL crate, git and curl cannot read it
//! differently, and its host is judged and pinned as the repository's is. Only the gitlinks
//! git populated, reached through plain directories, are descended into. The token goes with a
//! submodule's fetch only where the connection names its repository
//! (`submodule_repositories`), at the same forge as the token goes to for the pushed one, as
//! an `http.<its URL>.extraHeader`; a submodule not named whose URL lies under one named
//! (where git would send that header too) fails the checkout.

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
/// Most bytes of git's standard output read (the listing of a repository's files, for its
/// gitlinks: past it, the checkout fails rather than hold more).
const MAX_STDOUT: usize = 64 << 20;
/// Most bytes of the end of git's error output held (a server's `remote:` lines reach it).
const MAX_STDERR: usize = 64 << 10;
/// A fetch that receives nothing for this long fails.
const LOW_SPEED_SECS: u64 = 60;
/// Most levels of submodules below the repository checked out (its own are the first).
pub const SUBMODULE_LEVELS: usize = 8;
/// Most submodules checked out in all levels together.
pub const MAX_SUBMODULES: usize = 256;

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
    /// Which submodules' URLs the token goes to (see [`Source::with_submodule_token`]).
    submodule_token: Option<SubmoduleToken>,
}

/// The submodules a checkout's token may go to: repositories at the connection's forge that
/// the connection names.
#[derive(Clone)]
struct SubmoduleToken {
    checkout: Checkout,
    api_url: Option<String>,
    repositories: Vec<String>,
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
        if !taskmesh_events::is_commit_id(&commit) {
            return Err(format!("'{}' is not a full commit id", checkout.commit));
        }
        let auth = token.as_deref().map(|t| checkout.forge.git_auth(t));
        Ok(Self { url, commit, auth, token, options: Default::default(), submodule_token: None })
    }

    /// Lets the token go with submodules fetched from repositories at `checkout`'s forge (as
    /// `api_url` places it) that match one of `repositories` (`owner/name` patterns with `*`):
    /// the connection's choice. Nothing changes when the fetch carries no token, or when
    /// `repositories` is empty.
    pub fn with_submodule_token(mut self, checkout: &Checkout, api_url: Option<&str>, repositories: &[String]) -> Self {
        if self.auth.is_some() && !repositories.is_empty() {
            let (checkout, api_url, repositories) =
                (checkout.clone(), api_url.map(String::from), repositories.to_vec());
            self.submodule_token = Some(SubmoduleToken { checkout, api_url, repositories });
        }
        self
    }

    /// The `Authorization` header a submodule's fetch from `url` (as git wrote it) carries,
    /// if the connection lets the token go there.
    fn submodule_auth(&self, url: &str) -> Option<&str> {
        let scope = self.submodule_token.as_ref()?;
        let named = scope.checkout.forge_repository(scope.api_url.as_deref(), url)?;
        // (A pattern ingest would refuse, stored by an older version, names nothing.)
        let allowed = scope.repositories.iter().any(|p| {
            taskmesh_events::submodule_pattern_ok(p) && taskmesh_events::glob_match(&p.to_ascii_lowercase(), &named)
        });
        allowed.then_some(self.auth.as_deref()).flatten()
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
        let values: Vec<String> = self.token.iter().chain(&self.auth).cloned().collect();
        taskmesh_secrets::mask(text, &taskmesh_secrets::masked_forms(&values))
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
        // No hook runs, wherever a repository's content could place one.
        ("core.hooksPath".to_string(), "/dev/null".to_string()),
    ];
    if let Some(pin) = pin(&source.url, egress).await? {
        config.push(("http.curloptResolve".into(), pin));
    }
    // git and curl read files in `HOME` (`.netrc`, attributes): an empty directory of the
    // executor's, not the checkout, which is the pusher's.
    let home = tempfile::tempdir().map_err(|e| format!("making a home for git: {e}"))?;
    let mut fetching = config.clone();
    if let Some(auth) = &source.auth {
        // Only for the repository's URL and those under it (git matches the path at `/`).
        fetching.push((format!("http.{}.extraHeader", source.url), format!("Authorization: {auth}")));
    }
    // git runs as the executor, not as the step's user: steps of that user (other tenants'
    // among them) must not find the token in its environment. The files are the step's after.
    let git = |args: &'static [&'static str], extra: Vec<String>| git(source, dir, home.path(), &fetching, args, extra);
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
    if source.options.submodules {
        // Without the token, but for the repositories the connection names.
        submodules(source, dir, home.path(), config, egress).await?;
    }
    if let Some((uid, gid)) = run_as {
        let dir = workspace.to_path_buf();
        tokio::task::spawn_blocking(move || give(&dir, uid, gid))
            .await
            .map_err(|e| format!("giving the checkout to uid {uid}: {e}"))?
            .map_err(|e| format!("giving the checkout to uid {uid}: {e}"))?;
    }
    Ok(())
}

/// Checks out the submodules of the repository checked out in `top`, and theirs, level by
/// level, with git's `submodule init` (which resolves their URLs) and `submodule update`
/// (which fetches each at the commit its superproject records, as deep as the checkout asks),
/// checking every URL git resolved before it is fetched from and pinning its host.
async fn submodules(
    source: &Source,
    top: &Path,
    home: &Path,
    mut config: Vec<(String, String)>,
    egress: &taskmesh_egress::Egress,
) -> Result<(), String> {
    // The hosts (and ports) pinned so far: the repository's, then each submodule's.
    let mut pinned = vec![host_port(&source.url)];
    // The submodules' URLs the token goes to, at this level and those above.
    let mut told: Vec<url::Url> = Vec::new();
    // The repositories of this level: where each is, and its path from the top, for messages.
    let mut level = vec![(top.to_path_buf(), String::new())];
    let mut seen = 0;
    for depth in 0..=SUBMODULE_LEVELS {
        let mut next = Vec::new();
        for (dir, shown) in &level {
            let gitlinks = gitlinks(source, dir, home, &config).await?;
            if gitlinks.is_empty() {
                continue;
            }
            if depth == SUBMODULE_LEVELS {
                return Err(format!("submodules nested more than {SUBMODULE_LEVELS} levels deep, in {shown}"));
            }
            seen += gitlinks.len();
            if seen > MAX_SUBMODULES {
                return Err(format!("more than {MAX_SUBMODULES} submodules"));
            }
            git(source, dir, home, &config, &["submodule", "--quiet", "init"], vec![]).await?;
            let listed = git(source, dir, home, &config, &["config", "--local", "--list", "-z"], vec![]).await?;
            // This level's URLs that the token does not go to (as git wrote them, and read), to
            // check against those it does.
            let mut untold = Vec::new();
            for (name, url) in submodule_urls(&listed) {
                if name.chars().any(|c| c.is_control() || c == '\\') {
                    return Err(format!("submodule name '{}' is not of plain characters", name.escape_debug()));
                }
                // A user name alone (Bitbucket's and Azure DevOps' clone URLs carry one) asks
                // for nothing the fetch could give without a password: it goes.
                let url = match without_user(&url) {
                    Some(bare) => {
                        let key = format!("submodule.{name}.url");
                        git(source, dir, home, &config, &["config", "--local"], vec![key, bare.clone()]).await?;
                        bare
                    }
                    None => url,
                };
                let parsed = submodule_url(&url).map_err(|e| format!("submodule {shown}{name}: {e}"))?;
                // Only for that repository's URL as git will ask for it, where the connection
                // names it.
                match source.submodule_auth(&url) {
                    Some(auth) => {
                        config.push((format!("http.{url}.extraHeader"), format!("Authorization: {auth}")));
                        told.push(parsed.clone());
                    }
                    None => untold.push((format!("{shown}{name}"), url.clone(), parsed.clone())),
                }
                let url = parsed;
                let at = host_port(&url);
                if !pinned.contains(&at) {
                    let pin = pin(&url, egress).await.map_err(|e| format!("submodule {shown}{name}: {e}"))?;
                    config.extend(pin.map(|pin| ("http.curloptResolve".to_string(), pin)));
                    pinned.push(at);
                }
            }
            // git sends a header configured for a URL with every request under it too: none of
            // those not named may be under one named, as this judges and as git's own URL
            // matching does (asked with the configuration the fetch runs with).
            for (shown, text, url) in &untold {
                if let Some(scoped) = told.iter().find(|t| under(t, url)) {
                    return Err(format!(
                        "submodule {shown}: '{url}' is under '{scoped}', which the token goes to, and is not itself named for it"
                    ));
                }
                if !told.is_empty() {
                    let matched =
                        git(source, dir, home, &config, &["config", "--get-urlmatch", "http"], vec![text.clone()])
                            .await?;
                    let header = |line: &str| line.to_ascii_lowercase().starts_with("http.extraheader");
                    if String::from_utf8_lossy(&matched).lines().any(header) {
                        return Err(format!(
                            "submodule {shown}: git would send '{url}' the token meant for a submodule named for it"
                        ));
                    }
                }
            }
            // Without `--checkout`: git then skips those whose `update` is `none`, as it always
            // does (a fresh clone is checked out whatever else `update` says).
            let mut update = vec!["--no-recommend-shallow".to_string()];
            if source.options.depth > 0 {
                update.push(format!("--depth={}", source.options.depth));
            }
            git(source, dir, home, &config, &["submodule", "--quiet", "update"], update).await?;
            // Those git skipped are not there to descend into.
            next.extend(
                gitlinks
                    .into_iter()
                    .filter(|path| populated(dir, path))
                    .map(|path| (dir.join(&path), format!("{shown}{path}/"))),
            );
        }
        level = next;
        if level.is_empty() {
            break;
        }
    }
    Ok(())
}

/// The paths of the gitlinks (submodules' commits) in the index of the repository in `dir`:
/// the submodules git knows of, whatever `.gitmodules` says. Any that is not a relative path
/// of plain names (a control character in it, say: git has had holes there) fails the
/// checkout before git acts on it.
async fn gitlinks(
    source: &Source,
    dir: &Path,
    home: &Path,
    config: &[(String, String)],
) -> Result<Vec<String>, String> {
    let listed = git(source, dir, home, config, &["ls-files", "--stage", "-z"], vec![]).await?;
    let mut paths = Vec::new();
    for entry in listed.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        // `<mode> <object> <stage>\t<path>`
        let Some(tab) = entry.iter().position(|b| *b == b'\t') else { continue };
        if !entry.starts_with(b"160000 ") {
            continue;
        }
        let path = &entry[tab + 1..];
        match std::str::from_utf8(path) {
            Ok(path) if plain_gitlink(path) => paths.push(path.to_string()),
            _ => {
                let shown = String::from_utf8_lossy(path);
                return Err(format!("submodule path '{}' is not a relative path of plain names", shown.escape_debug()));
            }
        }
    }
    Ok(paths)
}

/// Whether a gitlink's path is relative, of plain names (no `.`, `..`, `.git` or empty ones,
/// no control characters or `\\`).
fn plain_gitlink(path: &str) -> bool {
    taskmesh_events::workflow::is_plain_relative_path(path, 4096)
        && !path.split('/').any(|name| name.eq_ignore_ascii_case(".git"))
}

/// The submodules' `(name, url)` in `git config --list -z`'s output (`key\nvalue\0` each),
/// but for those git is not to update (`update = none`: it skips them).
fn submodule_urls(listed: &[u8]) -> Vec<(String, String)> {
    let entries: Vec<(String, String)> = listed
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (key, value) = entry.split_once('\n')?;
            Some((key.strip_prefix("submodule.")?.to_string(), value.to_string()))
        })
        .collect();
    let skipped = |name: &str| entries.iter().any(|(key, value)| key == &format!("{name}.update") && value == "none");
    entries
        .iter()
        .filter_map(|(key, url)| Some((key.strip_suffix(".url")?.to_string(), url.clone())))
        .filter(|(name, _)| !skipped(name))
        .collect()
}

/// `url` without its user name, if it names one and no password (`https://user@host/…`);
/// `None` otherwise (one with a password is refused as it is).
fn without_user(url: &str) -> Option<String> {
    let (scheme, rest) = [("https://", url.strip_prefix("https://")), ("http://", url.strip_prefix("http://"))]
        .into_iter()
        .find_map(|(scheme, rest)| Some((scheme, rest?)))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (user, _) = authority.split_once('@')?;
    let plain =
        !user.is_empty() && user.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~'));
    plain.then(|| format!("{scheme}{}", &rest[user.len() + 1..]))
}

/// A submodule's URL as git resolved it, if it is one to fetch from: `http` or `https`, a host
/// of letters, digits, `-` and `.` (as the URL crate writes it: no trailing dot, no short or
/// hexadecimal IPv4 form) with an optional port, and a path of names of letters, digits and
/// `-._~` (no `.` or `..`). Nothing else: no credentials, percent-escapes, backslashes, query
/// or IPv6 literal, where the URL crate, git and curl might each find another host.
fn submodule_url(text: &str) -> Result<url::Url, String> {
    let refused =
        || format!("'{}' is not an http(s) URL of a host name and a path of plain names", text.escape_debug());
    let rest = text.strip_prefix("https://").or_else(|| text.strip_prefix("http://")).ok_or_else(refused)?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = authority.split_once(':').unwrap_or((authority, "80"));
    // No empty label (`git.example.` is the same host to git's URL matching, not to ours).
    let plain_host = host.split('.').all(|label| !label.is_empty())
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
    let plain_port = !port.is_empty() && port.len() <= 5 && port.chars().all(|c| c.is_ascii_digit());
    let plain_path = path.split('/').all(|name| {
        !matches!(name, "." | "..")
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~'))
    });
    if !(plain_host && plain_port && plain_path) {
        return Err(refused());
    }
    let url = url::Url::parse(text).map_err(|_| refused())?;
    match url.host() {
        Some(url::Host::Domain(_) | url::Host::Ipv4(_)) if same_host(&url, host) => Ok(url),
        _ => Err(refused()),
    }
}

/// Whether `written`, a URL's host as written, is the host the URL crate read (lower case, as
/// it writes it, so the pin's name is the one curl looks up whatever its version):
/// `10.0.0.5.` or `127.1` are read as addresses, which are judged as they are, while curl
/// would look the text up as a name, unpinned.
fn same_host(url: &url::Url, written: &str) -> bool {
    url.host_str() == Some(written)
}

/// Whether git sends what is configured for the URL `scoped` with requests for `url`: the
/// same scheme, host and port, and `url`'s path `scoped`'s or under it (compared without
/// regard to case, which refuses more than git would send to).
fn under(scoped: &url::Url, url: &url::Url) -> bool {
    let (top, path) = (scoped.path().trim_end_matches('/').to_ascii_lowercase(), url.path().to_ascii_lowercase());
    scoped.scheme() == url.scheme()
        && host_port(scoped) == host_port(url)
        && (path.trim_end_matches('/') == top || path.starts_with(&format!("{top}/")))
}

/// The host and port a URL connects to (the host without a trailing dot, which names the
/// same one).
fn host_port(url: &url::Url) -> (String, Option<u16>) {
    let host = url.host_str().unwrap_or_default().trim_end_matches('.');
    (host.to_ascii_lowercase(), url.port_or_known_default())
}

/// Whether the gitlink at `path` under `dir` was checked out as a repository by plain
/// directories (no symbolic link on the way), so the next level may look in it.
fn populated(dir: &Path, path: &str) -> bool {
    if !taskmesh_events::workflow::is_plain_relative_path(path, 4096) {
        return false;
    }
    let mut at = dir.to_path_buf();
    for name in path.split('/') {
        at.push(name);
        if !std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir()) {
            return false;
        }
    }
    std::fs::symlink_metadata(at.join(".git")).is_ok_and(|m| m.is_file())
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
    let port = url.port_or_known_default().ok_or("the URL has no port")?;
    let host = match url.host() {
        Some(url::Host::Domain(host)) => host.to_string(),
        Some(_) => return egress.check_url(url).map(|()| None).map_err(|e| e.to_string()),
        None => return Err("the URL has no host".into()),
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
        (true, Some(denied)) => Err(taskmesh_egress::DeniedHost { host, denied }.to_string()),
        (true, None) => Err(format!("{host} resolves to no address")),
    }
}

/// Runs `git args extra…` in `dir` with only `config` for configuration, in a process group
/// of its own that is killed whole if this is dropped before it ends (a timeout, a
/// cancellation): git's transport helpers would otherwise outlive it, token and all. Its
/// standard output, once it succeeded.
async fn git(
    source: &Source,
    dir: &Path,
    home: &Path,
    config: &[(String, String)],
    args: &[&str],
    extra: Vec<String>,
) -> Result<Vec<u8>, String> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.args(args)
        .args(extra)
        .current_dir(dir)
        .env_clear()
        .env("PATH", GIT_PATH)
        .env("HOME", home)
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
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("starting git (is it installed on the executor?): {e}"))?;
    let mut group = KillGroup(child.id().map(|p| nix::unistd::Pid::from_raw(p as i32)));
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let ((stdout, too_much), (stderr, _)) =
        tokio::join!(read_bounded(stdout, MAX_STDOUT, false), read_bounded(stderr, MAX_STDERR, true));
    let status = child.wait().await.map_err(|e| format!("waiting for git: {e}"))?;
    // It ended (and waited for its helpers): its id may be another's from now on.
    group.0 = None;
    if status.success() && too_much {
        return Err(format!("git {} printed more than {} MiB", args[0], MAX_STDOUT >> 20));
    }
    if status.success() {
        return Ok(stdout);
    }
    let said = source.mask(String::from_utf8_lossy(&stderr).trim());
    let tail = &said[said.floor_char_boundary(said.len().saturating_sub(ERROR_TAIL))..];
    Err(format!("git {} failed ({status}): {}", args[0], printable(tail)))
}

/// Everything `from` gives, of which at most `max` bytes are held: the first (or with
/// `tail`, the last); and whether there was more. Read to its end either way, so the writer
/// is never left blocked.
async fn read_bounded(from: Option<impl tokio::io::AsyncRead + Unpin>, max: usize, tail: bool) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt as _;
    let (mut held, mut more) = (Vec::new(), false);
    let Some(mut from) = from else { return (held, more) };
    let mut chunk = vec![0; 64 << 10];
    while let Ok(n @ 1..) = from.read(&mut chunk).await {
        held.extend_from_slice(&chunk[..n]);
        if held.len() > max {
            more = true;
            match tail {
                true => drop(held.drain(..held.len() - max)),
                false => held.truncate(max),
            }
        }
    }
    (held, more)
}

/// `text` with its control characters (but line breaks and tabs) escaped: what a repository
/// or its server wrote reaches logs and terminals.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c.is_control() && !matches!(c, '\n' | '\t') {
            true => c.escape_debug().to_string(),
            false => c.to_string(),
        })
        .collect()
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

    #[test]
    fn a_submodule_url_is_fetched_only_when_nothing_can_read_another_host_in_it() {
        for fine in
            ["https://github.com/o/lib.git", "http://127.0.0.1:8080/o/lib.git", "https://git.example/a/b/c_d-e~f"]
        {
            assert!(submodule_url(fine).is_ok(), "{fine}");
        }
        let refused = [
            "ssh://git@github.com/o/lib.git",
            "git@github.com:o/lib.git",
            "file:///etc",
            "/srv/git/lib.git",
            "../lib.git",
            "https://user:pw@github.com/o/lib.git",
            "https://github.com\\@evil.example/o/lib.git",
            "https://evil.example%2f@github.com/x",
            "https://[::1]/o/lib.git",
            "https://github.com/o/../../x",
            "https://github.com/o/lib.git?x=1",
            "https://github.com:99999/o/lib.git",
            "https://github.com/o/lib .git",
            "https:///o/lib.git",
            "ext::sh -c id",
            // Read as addresses by the URL crate, looked up as names by curl.
            "http://10.0.0.5.:80/o/x",
            "http://127.1/o/x",
            "http://0x7f.1/o/x",
        ];
        for bad in refused {
            assert!(submodule_url(bad).is_err(), "{bad}");
        }
        assert!(submodule_url("ssh://x/y").unwrap_err().contains("not an http(s) URL"));
        // What it says shows no control character as it is.
        assert!(submodule_url("https://h/o\n\x1b[2J").unwrap_err().contains("o\\n\\u{1b}[2J"));
        assert!(submodule_url("https://GitHub.com/o/lib.git").is_err(), "a host in lower case only");
    }

    #[test]
    fn a_header_scoped_to_a_url_goes_with_the_urls_under_it_alone() {
        let url = |u: &str| url::Url::parse(u).unwrap();
        let scoped = url("https://git.example/acme/lib");
        for covered in
            ["https://git.example/acme/lib", "https://git.example/acme/lib/", "https://git.example/Acme/Lib/x.git"]
        {
            assert!(under(&scoped, &url(covered)), "{covered}");
        }
        for apart in [
            "https://git.example/acme/lib.git",
            "https://git.example/acme/library",
            "https://git.example/acme",
            "http://git.example/acme/lib/x",
            "https://git.example:8443/acme/lib/x",
            "https://other.example/acme/lib/x",
        ] {
            assert!(!under(&scoped, &url(apart)), "{apart}");
        }
        assert!(under(&url("https://git.example:443/acme/lib"), &url("https://git.example/acme/lib/x")));
        assert!(under(&scoped, &url("https://git.example./acme/lib/x")), "a trailing dot names the same host");
        for empty_label in
            ["https://git.example./acme/lib", "https://git..example/acme/lib", "https://.git.example/a/b"]
        {
            assert!(submodule_url(empty_label).is_err(), "{empty_label}");
        }
    }

    #[test]
    fn a_submodule_token_goes_only_to_the_repositories_the_connection_names_at_its_forge() {
        let pushed = checkout("https://git.example/o/r.git", &"a".repeat(40));
        let source = |token: Option<&str>, repositories: &[&str]| {
            let repositories: Vec<String> = repositories.iter().map(|r| r.to_string()).collect();
            Source::new(&pushed, token.map(String::from)).unwrap().with_submodule_token(
                &pushed,
                Some("https://git.example"),
                &repositories,
            )
        };
        let told = source(Some("tok"), &["acme/*", "o/Lib"]);
        assert!(told.submodule_auth("https://git.example/acme/x.git").is_some());
        assert!(told.submodule_auth("https://git.example/O/lib").is_some());
        for untold in
            ["https://git.example/o/other.git", "https://other.example/acme/x.git", "http://git.example/acme/x"]
        {
            assert!(told.submodule_auth(untold).is_none(), "{untold}");
        }
        assert!(source(Some("tok"), &[]).submodule_auth("https://git.example/acme/x.git").is_none(), "none named");
        assert!(source(None, &["acme/*"]).submodule_auth("https://git.example/acme/x.git").is_none(), "no token");
        assert!(source(Some("tok"), &["*"]).submodule_auth("https://git.example/acme/x.git").is_none(), "no owner");
    }

    #[test]
    fn a_user_name_alone_is_dropped_from_a_submodule_url() {
        let bare = |url: &str| without_user(url);
        assert_eq!(
            bare("https://team@bitbucket.org/team/lib.git").as_deref(),
            Some("https://bitbucket.org/team/lib.git")
        );
        assert_eq!(
            bare("https://org@dev.azure.com/org/p/_git/lib").as_deref(),
            Some("https://dev.azure.com/org/p/_git/lib")
        );
        assert_eq!(bare("http://u@127.0.0.1:8080/o/lib.git").as_deref(), Some("http://127.0.0.1:8080/o/lib.git"));
        for kept in
            ["https://u:p@h/o/lib.git", "https://h/o/lib.git", "ssh://git@h/o/lib.git", "https://h/a@b", "https://@h/x"]
        {
            assert_eq!(bare(kept), None, "{kept}");
        }
        // What is left is checked as any URL is.
        assert!(submodule_url(&bare("https://u@h.example\\@evil/x").unwrap_or_default()).is_err());
    }

    #[test]
    fn submodule_urls_are_read_from_the_config_list() {
        let listed = b"core.bare\nfalse\0remote.origin.url\nhttps://h/o/r.git\0submodule.vendor/lib.url\nhttps://h/o/lib.git\0submodule.a.b.url\n../x.git\0submodule.vendor/lib.active\ntrue\0submodule.opt.url\nssh://h/x\0submodule.opt.update\nnone\0submodule.c.update\nrebase\0submodule.c.url\nhttps://h/c\0";
        assert_eq!(
            submodule_urls(listed),
            [
                ("vendor/lib".to_string(), "https://h/o/lib.git".to_string()),
                ("a.b".to_string(), "../x.git".to_string()),
                ("c".to_string(), "https://h/c".to_string()),
            ]
        );
    }

    #[test]
    fn a_gitlink_path_must_be_plain_names_and_git_output_shows_no_control_character() {
        assert!(plain_gitlink("vendor/lib") && plain_gitlink("a b/c-d.e"));
        for bad in ["sub\r", "a/.GIT/b", ".git", "../x", "/abs", "a\\b", "a//b", "", "a/./b", "x\u{1b}[2J"] {
            assert!(!plain_gitlink(bad), "{bad:?}");
        }
        assert_eq!(printable("remote: \u{1b}[31mred\r\nnext\tline"), "remote: \\u{1b}[31mred\\r\nnext\tline");
    }

    #[tokio::test]
    async fn what_git_prints_is_held_within_bounds_and_read_to_its_end() {
        let text: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let (head, more) = read_bounded(Some(&text[..]), 1000, false).await;
        assert_eq!((&head[..], more), (&text[..1000], true));
        let (tail, more) = read_bounded(Some(&text[..]), 1000, true).await;
        assert_eq!((&tail[..], more), (&text[text.len() - 1000..], true));
        let (all, more) = read_bounded(Some(&text[..10]), 1000, false).await;
        assert_eq!((&all[..], more), (&text[..10], false));
    }

    #[test]
    fn only_a_gitlink_reached_through_plain_directories_is_descended_into() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("vendor/lib")).unwrap();
        std::fs::write(dir.path().join("vendor/lib/.git"), "gitdir: ../../.git/modules/lib\n").unwrap();
        assert!(populated(dir.path(), "vendor/lib"));
        // Not populated, or by way of a link (here to the populated one), or leaving the tree.
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        assert!(!populated(dir.path(), "empty"));
        std::os::unix::fs::symlink(dir.path().join("vendor"), dir.path().join("link")).unwrap();
        assert!(!populated(dir.path(), "link/lib"));
        assert!(!populated(dir.path(), "../x") && !populated(dir.path(), "/etc"));
    }

    #[tokio::test]
    async fn a_repository_at_a_denied_address_is_not_fetched() {
        let egress = taskmesh_egress::Egress::default();
        let metadata = url::Url::parse("http://169.254.169.254/o/r.git").unwrap();
        assert!(pin(&metadata, &egress).await.unwrap_err().contains("denied"));
        let local = url::Url::parse("http://localhost:8080/o/r.git").unwrap();
        let pinned = pin(&local, &egress).await.unwrap().unwrap();
        assert!(pinned.starts_with("localhost:8080:"), "{pinned}");
        // A name whose every address is denied: the refusal names it.
        let strict =
            taskmesh_egress::Egress::new(&taskmesh_config::EgressSettings { deny_private: true, ..Default::default() });
        let refused = pin(&local, &strict).await.unwrap_err();
        assert!(refused.starts_with("localhost: egress to "), "{refused}");
    }
}
