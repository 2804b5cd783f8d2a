//! The fault harness's network: every host (a confab node, a NATS server, a group of clients)
//! in its own Linux network namespace, each on a veth pair to one bridge in the root
//! namespace, all inside this machine. [`Net`] owns all of it: it creates the bridge and the
//! namespaces, cuts, heals and thins links with nftables rules inside a host's namespace,
//! starts processes in a host (`ip netns exec`), opens sockets in a host (a thread that enters
//! the namespace, so the test's own tokio runtime drives them), and removes everything again
//! when dropped, also when a test panics.
//!
//! Needs root (`CAP_NET_ADMIN`, `CAP_SYS_ADMIN` for `setns`), `ip` (iproute2) and `nft`
//! (nftables). [`Net::available`] says why it cannot run, so a test skips loudly when not root.
//!
//! Names: every namespace is `cf<pid>-<host>` and every link `cf<pid><host>` (15 bytes at
//! most), so a run that was killed (no Drop) is found and removed by the next one
//! ([`Net::sweep_leftovers`]), and two test binaries never share a name. One process runs one
//! [`Net`] at a time ([`Net::up`] waits for the previous one to go): the subnet is per
//! process, and the machine has two cores to share.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::{Arc, LazyLock};

static ONE_AT_A_TIME: LazyLock<Arc<tokio::sync::Mutex<()>>> =
    LazyLock::new(|| Arc::new(tokio::sync::Mutex::new(())));

/// One host on the bridge: its namespace and address.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

/// The bridge, the hosts on it and the faults set on them. Dropping it removes them all.
pub struct Net {
    prefix: String,
    bridge: String,
    subnet: [u8; 3],
    hosts: BTreeMap<String, Host>,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

/// Runs a command and returns its stdout, or what went wrong.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// [`run`] that must succeed: the harness cannot go on otherwise.
fn must(program: &str, args: &[&str]) -> String {
    run(program, args).unwrap_or_else(|e| panic!("fault harness: {e}"))
}

/// `nft -f -` with `script` on stdin, inside `netns`.
fn nft(netns: &str, script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {netns}: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Why the harness cannot run here (not root, or a tool missing), or `None`.
    pub fn available() -> Option<String> {
        let uid = run("id", &["-u"]).unwrap_or_default();
        if uid.trim() != "0" {
            return Some(format!(
                "needs root for network namespaces (uid {})",
                uid.trim()
            ));
        }
        for tool in [["ip", "-V"], ["nft", "--version"]] {
            if let Err(e) = run(tool[0], &tool[1..]) {
                return Some(format!("needs {} ({e})", tool[0]));
            }
        }
        None
    }

    /// The bridge and one namespace per name in `hosts`, each with an address; waits for a
    /// [`Net`] of this process still up to be dropped first.
    pub async fn up(hosts: &[&str]) -> Net {
        let turn = ONE_AT_A_TIME.clone().lock_owned().await;
        Self::sweep_leftovers();
        let pid = std::process::id();
        let prefix = format!("cf{pid}");
        // A /24 per process, so that a soak and the test suite can run side by side.
        let subnet = [10, 77, (pid % 250) as u8];
        let mut net = Net {
            bridge: format!("{prefix}br"),
            prefix,
            subnet,
            hosts: BTreeMap::new(),
            _turn: turn,
        };
        net.teardown();
        let gateway = format!("{}.{}.{}.1/24", subnet[0], subnet[1], subnet[2]);
        must(
            "ip",
            &[
                "link",
                "add",
                &net.bridge,
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        );
        // The root namespace has an address on the bridge: the test process observes every
        // host from there (health, metrics, the NATS monitor), through no fault it sets.
        must("ip", &["addr", "add", &gateway, "dev", &net.bridge]);
        must("ip", &["link", "set", &net.bridge, "up"]);
        for (i, name) in hosts.iter().enumerate() {
            net.add_host(name, 10 + i as u8);
        }
        net
    }

    fn add_host(&mut self, name: &str, last: u8) {
        assert!(
            self.prefix.len() + name.len() <= 15,
            "host name {name} too long"
        );
        let netns = format!("{}-{name}", self.prefix);
        let outer = format!("{}{name}", self.prefix);
        let inner = format!("{}{name}i", self.prefix.trim_start_matches("cf"));
        let ip = Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], last);
        must("ip", &["netns", "add", &netns]);
        must(
            "ip",
            &[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ],
        );
        must("ip", &["link", "set", &inner, "netns", &netns]);
        must("ip", &["link", "set", &outer, "master", &self.bridge]);
        must("ip", &["link", "set", &outer, "up"]);
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &netns, "ip"];
            all.extend_from_slice(args);
            must("ip", &all);
        };
        exec(&["link", "set", &inner, "name", "eth0"]);
        exec(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        exec(&["link", "set", "eth0", "up"]);
        exec(&["link", "set", "lo", "up"]);
        // The table every fault of this host is a rule in: `cut` drops to and from the hosts
        // named, `loss` drops a share of every packet on eth0 (not on lo, where a relay may
        // listen). Faults go in their own chains so `heal` flushes them and nothing else.
        let table = "table inet cf {\n\
             chain cut_in { type filter hook input priority 0; }\n\
             chain cut_out { type filter hook output priority 0; }\n\
             chain loss_in { type filter hook input priority 1; }\n\
             chain loss_out { type filter hook output priority 1; }\n\
             }\n";
        nft(&netns, table).unwrap_or_else(|e| panic!("fault harness: {e}"));
        self.hosts.insert(
            name.to_owned(),
            Host {
                name: name.to_owned(),
                netns,
                ip,
            },
        );
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .get(name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// The root namespace's address on the bridge (where the test observes from).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 1)
    }

    /// Cuts `host` off from every host in `from`, both ways (the packets are dropped, as on a
    /// dead link: TCP connections stall, none is reset).
    pub fn cut(&self, host: &str, from: &[&str]) {
        let ips: Vec<String> = from.iter().map(|h| self.host(h).ip.to_string()).collect();
        let set = ips.join(", ");
        let script = format!(
            "add rule inet cf cut_in ip saddr {{ {set} }} drop\n\
             add rule inet cf cut_out ip daddr {{ {set} }} drop\n"
        );
        nft(&self.host(host).netns, &script).unwrap_or_else(|e| panic!("fault harness: {e}"));
    }

    /// Removes every cut of `host`.
    pub fn heal(&self, host: &str) {
        let script = "flush chain inet cf cut_in\nflush chain inet cf cut_out\n";
        nft(&self.host(host).netns, script).unwrap_or_else(|e| panic!("fault harness: {e}"));
    }

    /// Drops `percent` % of the packets on `host`'s link, each way (0 removes the loss).
    pub fn loss(&self, host: &str, percent: u8) {
        let mut script = "flush chain inet cf loss_in\nflush chain inet cf loss_out\n".to_owned();
        if percent > 0 {
            script.push_str(&format!(
                "add rule inet cf loss_in iifname \"eth0\" numgen random mod 100 < {percent} drop\n\
                 add rule inet cf loss_out oifname \"eth0\" numgen random mod 100 < {percent} drop\n"
            ));
        }
        nft(&self.host(host).netns, &script).unwrap_or_else(|e| panic!("fault harness: {e}"));
    }

    /// A command that runs `program` inside `host`'s namespace (`ip netns exec` execs it, so
    /// the child's pid is the program's own).
    pub fn command(&self, host: &str, program: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.host(host).netns, program]);
        cmd
    }

    /// Runs `open` on a thread inside `host`'s namespace (see [`within_netns`]).
    pub async fn within<T: Send + 'static>(
        &self,
        host: &str,
        open: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        within_netns(self.netns_path(host), open).await
    }

    /// The file that names `host`'s namespace.
    pub fn netns_path(&self, host: &str) -> String {
        format!("/var/run/netns/{}", self.host(host).netns)
    }

    /// A TCP connection from `host` to `to`, for the test's tokio runtime.
    pub async fn connect(
        &self,
        host: &str,
        to: SocketAddr,
        timeout: std::time::Duration,
    ) -> std::io::Result<tokio::net::TcpStream> {
        connect_from(self.netns_path(host), to, timeout).await
    }

    /// A TCP listener in `host` on `addr`, for the test's tokio runtime.
    pub async fn listen(
        &self,
        host: &str,
        addr: SocketAddr,
    ) -> std::io::Result<tokio::net::TcpListener> {
        let std = self
            .within(host, move || {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .await?;
        tokio::net::TcpListener::from_std(std)
    }

    /// Removes the namespaces and links of runs whose process is gone (killed, so no Drop).
    pub fn sweep_leftovers() {
        let stale = |name: &str| {
            let digits: String = name
                .strip_prefix("cf")
                .unwrap_or("")
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            !digits.is_empty()
                && digits != std::process::id().to_string()
                && !std::path::Path::new(&format!("/proc/{digits}")).exists()
        };
        for ns in run("ip", &["netns", "list"]).unwrap_or_default().lines() {
            let name = ns.split_whitespace().next().unwrap_or("");
            if stale(name) {
                kill_and_delete_netns(name);
            }
        }
        for link in run("ip", &["-o", "link", "show"])
            .unwrap_or_default()
            .lines()
        {
            // "12: cf123br: <...": the name, without any "@peer".
            let name = link
                .split(": ")
                .nth(1)
                .and_then(|n| n.split('@').next())
                .unwrap_or("");
            if stale(name) {
                let _ = run("ip", &["link", "del", name]);
            }
        }
    }

    /// Removes everything of this process's prefix: idempotent, and what Drop does.
    fn teardown(&self) {
        for ns in run("ip", &["netns", "list"]).unwrap_or_default().lines() {
            let name = ns.split_whitespace().next().unwrap_or("");
            if name.starts_with(&format!("{}-", self.prefix)) {
                kill_and_delete_netns(name);
            }
        }
        // Deleting a namespace deletes its veth ends, and so their peers, but only once the
        // namespace is gone, after its processes have exited: the next test of this process
        // could find a root end of the same name still there ("File exists"). Deleting the
        // root ends deletes each pair at once.
        for name in self.hosts.keys() {
            let _ = run("ip", &["link", "del", &format!("{}{name}", self.prefix)]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }

    /// The address `port` of `host`.
    pub fn addr(&self, host: &str, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.host(host).ip), port)
    }
}

/// Runs `open` on a new thread inside the namespace named by the file `netns_path`: sockets
/// it creates belong to that host (a socket keeps the namespace it was made in, whichever
/// thread uses it later).
pub async fn within_netns<T: Send + 'static>(
    netns_path: String,
    open: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let entered = std::fs::File::open(&netns_path).and_then(|f| {
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
        let _ = tx.send(entered.and_then(|()| open()));
    });
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
}

/// A TCP connection to `to` made from the namespace named by `netns_path`, for the caller's
/// tokio runtime.
pub async fn connect_from(
    netns_path: String,
    to: SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let std = within_netns(netns_path, move || {
        let s = std::net::TcpStream::connect_timeout(&to, timeout)?;
        s.set_nonblocking(true)?;
        s.set_nodelay(true)?;
        Ok(s)
    })
    .await?;
    tokio::net::TcpStream::from_std(std)
}

/// Kills what still runs in `netns` (a process there keeps it alive) and deletes it.
fn kill_and_delete_netns(netns: &str) {
    for pid in run("ip", &["netns", "pids", netns])
        .unwrap_or_default()
        .split_whitespace()
    {
        let _ = run("kill", &["-KILL", pid]);
    }
    let _ = run("ip", &["netns", "del", netns]);
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}
