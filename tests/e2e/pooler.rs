//! A mesh whose every Postgres connection goes through PgBouncer (session pooling, configured
//! as sqlx needs it: `ignore_startup_parameters = extra_float_digits`), as operators put one in
//! front of a managed Postgres. PgBouncer refuses the startup `options` the projector's own
//! connections carry its settings in; the projector must connect without them, not loop.

use std::net::TcpListener;
use std::time::Duration;

use crate::helpers::{Svc, spawn_with};

/// The `pgbouncer` binary: `TM_TEST_PGBOUNCER`, or Debian's. `scripts/test` installs it.
fn pgbouncer() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("TM_TEST_PGBOUNCER") {
        return Some(p.into());
    }
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

/// A PgBouncer in front of the test Postgres, on a free port, killed when dropped.
struct Bouncer {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Bouncer {
    async fn start(bin: &std::path::Path) -> Bouncer {
        let admin = std::env::var("TM_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let url = url::Url::parse(&admin).expect("TM_TEST_DATABASE_URL is a URL");
        let (host, pg_port, user) = (url.host_str().unwrap_or("127.0.0.1"), url.port().unwrap_or(5432), url.username());
        let password = url.password().map(|p| format!(" password={p}")).unwrap_or_default();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        // PgBouncer will not run as root: it is told to become Postgres's own user then, which
        // must be able to read its files.
        let root = nix::unistd::geteuid().is_root();
        if root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        std::fs::write(path.join("users.txt"), format!("\"{user}\" \"\"\n")).unwrap();
        std::fs::write(
            path.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host={host} port={pg_port} user={user}{password}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {users}\npool_mode = session\n\
                 ignore_startup_parameters = extra_float_digits\nmax_client_conn = 100\ndefault_pool_size = 40\n",
                users = path.join("users.txt").display()
            ),
        )
        .unwrap();
        let mut cmd = tokio::process::Command::new(bin);
        if root {
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(path.join("pgbouncer.ini"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("pgbouncer starts");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Bouncer { child, port, _dir: dir };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("pgbouncer did not listen on {port}");
    }
}

#[tokio::test]
async fn a_mesh_behind_pgbouncer_projects_runs() {
    let Some(bin) = pgbouncer() else {
        assert!(std::env::var_os("CI").is_none(), "pgbouncer is missing (scripts/test installs it)");
        eprintln!("skipped: pgbouncer is not installed (scripts/test installs it)");
        return;
    };
    let mut bouncer = Bouncer::start(&bin).await;
    let port = bouncer.port;
    let tm = spawn_with(&Svc::ALL, |s| {
        let direct = secrecy::ExposeSecret::expose_secret(&s.postgres.url).to_string();
        let mut url = url::Url::parse(&direct).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(port)).unwrap();
        s.postgres.url = secrecy::SecretString::from(url.to_string());
    })
    .await;
    // The tenant's key is projected (spawn_with waited for it), and a run's end reaches the
    // read side: the projector writes through the pooler.
    let id =
        tm.submit("name: pooled\nsteps:\n  - {id: a, run: 'echo hi'}\n  - {id: b, needs: [a], run: 'true'}\n").await;
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(bouncer.child.try_wait().unwrap().is_none(), "pgbouncer still runs");
    tm.finish().await;
}
