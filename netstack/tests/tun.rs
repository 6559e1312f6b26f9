//! End-to-end tests through a real tun device, with kernel TCP clients.
//!
//! Each test re-runs itself inside a fresh network namespace made with
//! `unshare --net`: the tun, its addresses and routes exist only there and
//! vanish with the process, whatever happens. Needs root (CI runs as root);
//! as another user every test prints why it skips and passes.

use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netstack::{IncomingFlow, Netstack, StackConfig, StackHandle, create_tun};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHILD_ENV: &str = "NETSTACK_TUN_TEST_CHILD";
const TUN: &str = "hlt0";

/// Kills the namespaced child if the parent test fails or panics.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `body` inside a new network namespace with a tun named [`TUN`]
/// routing 198.18.0.0/16, and a stack on it built from `config`.
fn in_netns<F, Fut>(name: &str, config: impl FnOnce(&mut StackConfig), body: F)
where
    F: FnOnce(Netstack) -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        run_child(config, body);
        return;
    }
    if !lab::preconditions::root_or_skip(name) {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let child = Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .stdin(Stdio::null())
        .spawn()
        .expect("run unshare (util-linux)");
    let mut guard = ChildGuard(Some(child));
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = guard.0.as_mut().unwrap().try_wait().unwrap() {
            guard.0 = None;
            break status;
        }
        assert!(Instant::now() < deadline, "{name} took more than 300 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "{name} failed inside its namespace: {status}"
    );
}

fn sh(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?} failed");
}

fn run_child<F, Fut>(config: impl FnOnce(&mut StackConfig), body: F)
where
    F: FnOnce(Netstack) -> Fut,
    Fut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tun = create_tun(TUN, 65535).expect("create tun");
        sh(&["ip", "link", "set", "lo", "up"]);
        sh(&["ip", "link", "set", TUN, "up"]);
        sh(&["ip", "addr", "add", "198.19.0.1/32", "dev", TUN]);
        sh(&[
            "ip",
            "route",
            "add",
            "198.18.0.0/16",
            "dev",
            TUN,
            "src",
            "198.19.0.1",
        ]);
        let mut c = StackConfig::new(vec!["198.18.0.0/16".parse().unwrap()]);
        config(&mut c);
        let stack = Netstack::spawn(tun, c).expect("spawn stack");
        body(stack).await;
    });
}

/// The tun's transmit queue length and the packets the kernel dropped
/// there, from `ip -s -j link show`.
fn tun_queue_and_drops() -> (u64, u64) {
    let out = Command::new("ip")
        .args(["-s", "-j", "link", "show", TUN])
        .output()
        .expect("run ip");
    let json = String::from_utf8(out.stdout).expect("ip prints UTF-8");
    let number_after = |from: usize, key: &str| -> u64 {
        let at = json[from..]
            .find(key)
            .unwrap_or_else(|| panic!("{key} in {json}"))
            + from;
        json[at + key.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or_else(|_| panic!("a number after {key} in {json}"))
    };
    let tx = json.find("\"tx\":{").expect("tx statistics");
    (
        number_after(0, "\"txqlen\":"),
        number_after(tx, "\"dropped\":"),
    )
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Accepts every flow and echoes its bytes until the client closes.
fn spawn_echo(mut stack: Netstack) -> StackHandle {
    let handle = stack.handle();
    tokio::spawn(async move {
        while let Some(flow) = stack.next_flow().await {
            tokio::spawn(async move {
                let mut s = flow.accept().await.unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    s.write_all(&buf[..n]).await.unwrap();
                }
                s.shutdown().await.unwrap();
            });
        }
    });
    handle
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[test]
fn accepted_flows_carry_bytes_to_several_addresses() {
    in_netns(
        "accepted_flows_carry_bytes_to_several_addresses",
        |_| {},
        |mut stack| async move {
            let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(flow) = stack.next_flow().await {
                    seen_tx.send((flow.src(), flow.dst())).unwrap();
                    tokio::spawn(async move {
                        let dst = flow.dst();
                        let mut s = flow.accept().await.unwrap();
                        let mut req = [0u8; 5];
                        s.read_exact(&mut req).await.unwrap();
                        s.write_all(
                            format!("{dst} got {}", String::from_utf8_lossy(&req)).as_bytes(),
                        )
                        .await
                        .unwrap();
                        s.shutdown().await.unwrap();
                    });
                }
            });
            for target in ["198.18.0.1:80", "198.18.7.9:5432", "198.18.255.254:1"] {
                let reply = blocking(move || {
                    let mut c =
                        TcpStream::connect_timeout(&addr(target), Duration::from_secs(5)).unwrap();
                    c.write_all(b"hello").unwrap();
                    let mut reply = String::new();
                    c.read_to_string(&mut reply).unwrap();
                    (reply, c.local_addr().unwrap())
                })
                .await;
                assert_eq!(reply.0, format!("{target} got hello"));
                let (src, dst) = seen_rx.recv().await.unwrap();
                assert_eq!(SocketAddr::V4(dst), addr(target));
                assert_eq!(SocketAddr::V4(src), reply.1);
            }
        },
    );
}

#[test]
fn refused_flow_is_econnrefused_at_once() {
    in_netns(
        "refused_flow_is_econnrefused_at_once",
        |c| {
            c.decision_timeout = Duration::from_millis(300);
        },
        |mut stack| async move {
            let handle = stack.handle();
            tokio::spawn(async move {
                while let Some(flow) = stack.next_flow().await {
                    match flow.dst().port() {
                        // Explicit refusal after an async check.
                        1 => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            flow.refuse();
                        }
                        // Never decided: refused by the decision timeout.
                        2 => std::mem::forget(flow),
                        // Accepted after a slow check (a dial taking time).
                        _ => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let mut s = flow.accept().await.unwrap();
                            s.write_all(b"late but fine").await.unwrap();
                        }
                    }
                }
            });
            let (err, took) = blocking(|| {
                let t = Instant::now();
                let e = TcpStream::connect(addr("198.18.0.9:1")).unwrap_err();
                (e.kind(), t.elapsed())
            })
            .await;
            assert_eq!(err, ErrorKind::ConnectionRefused);
            assert!(took < Duration::from_millis(500), "refusal took {took:?}");

            let (err, took) = blocking(|| {
                let t = Instant::now();
                let e = TcpStream::connect(addr("198.18.0.9:2")).unwrap_err();
                (e.kind(), t.elapsed())
            })
            .await;
            assert_eq!(err, ErrorKind::ConnectionRefused);
            assert!(
                took < Duration::from_millis(900),
                "timeout refusal took {took:?}"
            );
            assert_eq!(handle.stats().expired, 1);

            let (reply, took) = blocking(|| {
                let t = Instant::now();
                let mut c = TcpStream::connect(addr("198.18.0.9:3")).unwrap();
                let took = t.elapsed();
                let mut buf = [0u8; 13];
                c.read_exact(&mut buf).unwrap();
                (buf, took)
            })
            .await;
            assert_eq!(&reply, b"late but fine");
            assert!(
                took >= Duration::from_millis(190),
                "SYN-ACK only after accept: {took:?}"
            );
            assert_eq!(handle.stats().refused, 2);
        },
    );
}

#[test]
fn half_close_both_ways() {
    in_netns(
        "half_close_both_ways",
        |_| {},
        |mut stack| async move {
            tokio::spawn(async move {
                while let Some(flow) = stack.next_flow().await {
                    tokio::spawn(async move {
                        let port = flow.dst().port();
                        let mut s = flow.accept().await.unwrap();
                        if port == 1 {
                            // Client shuts down first: read to EOF, then answer.
                            let mut got = Vec::new();
                            s.read_to_end(&mut got).await.unwrap();
                            s.write_all(format!("read {} bytes", got.len()).as_bytes())
                                .await
                                .unwrap();
                            s.shutdown().await.unwrap();
                        } else {
                            // We shut down first: the client still sends after
                            // seeing our EOF.
                            s.write_all(b"bye").await.unwrap();
                            s.shutdown().await.unwrap();
                            let mut got = Vec::new();
                            s.read_to_end(&mut got).await.unwrap();
                            assert_eq!(got, b"after your fin");
                        }
                    });
                }
            });
            let reply = blocking(|| {
                let mut c = TcpStream::connect(addr("198.18.1.1:1")).unwrap();
                c.write_all(&[7u8; 100_000]).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                let mut reply = String::new();
                c.read_to_string(&mut reply).unwrap();
                reply
            })
            .await;
            assert_eq!(reply, "read 100000 bytes");
            blocking(|| {
                let mut c = TcpStream::connect(addr("198.18.1.1:2")).unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                assert_eq!(got, b"bye");
                c.write_all(b"after your fin").unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                // The flow closes cleanly: nothing more, no reset.
                let mut rest = Vec::new();
                c.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty());
            })
            .await;
        },
    );
}

#[test]
fn resets_pass_both_ways() {
    in_netns(
        "resets_pass_both_ways",
        |_| {},
        |mut stack| async move {
            let (result_tx, mut result_rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(flow) = stack.next_flow().await {
                    let result_tx = result_tx.clone();
                    tokio::spawn(async move {
                        let port = flow.dst().port();
                        let mut s = flow.accept().await.unwrap();
                        if port == 1 {
                            let mut b = [0u8; 4];
                            s.read_exact(&mut b).await.unwrap();
                            s.reset();
                        } else {
                            // The client closes with our data unread: its kernel
                            // answers with a RST.
                            s.write_all(b"unread").await.unwrap();
                            let mut buf = [0u8; 16];
                            let r = loop {
                                match s.read(&mut buf).await {
                                    Ok(0) => break Ok(0),
                                    Ok(_) => continue,
                                    Err(e) => break Err(e.kind()),
                                }
                            };
                            // A later read or write fails too.
                            let w = s.write_all(b"more").await.map_err(|e| e.kind());
                            result_tx.send((r, w)).unwrap();
                        }
                    });
                }
            });
            let err = blocking(|| {
                let mut c = TcpStream::connect(addr("198.18.2.2:1")).unwrap();
                c.write_all(b"ping").unwrap();
                let mut buf = [0u8; 1];
                c.read(&mut buf).unwrap_err().kind()
            })
            .await;
            assert_eq!(err, ErrorKind::ConnectionReset);
            blocking(|| {
                let mut c = TcpStream::connect(addr("198.18.2.2:2")).unwrap();
                c.write_all(b"x").unwrap();
                std::thread::sleep(Duration::from_millis(200));
                drop(c);
            })
            .await;
            let (r, w) = tokio::time::timeout(Duration::from_secs(5), result_rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(r, Err(ErrorKind::ConnectionReset));
            assert!(w.is_err());
        },
    );
}

const GIB: u64 = 1 << 30;

fn pattern_chunk(seed: u8) -> Vec<u8> {
    (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(31) as u8) ^ seed)
        .collect()
}

#[test]
fn one_gib_each_way_with_matching_sha256() {
    in_netns(
        "one_gib_each_way_with_matching_sha256",
        |_| {},
        |mut stack| async move {
            tokio::spawn(async move {
                while let Some(flow) = stack.next_flow().await {
                    tokio::spawn(async move {
                        let port = flow.dst().port();
                        let mut s = flow.accept().await.unwrap();
                        if port == 1 {
                            // Sink: hash what the client sends, answer the digest.
                            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                            let mut buf = vec![0u8; 256 * 1024];
                            loop {
                                let n = s.read(&mut buf).await.unwrap();
                                if n == 0 {
                                    break;
                                }
                                ctx.update(&buf[..n]);
                            }
                            s.write_all(ctx.finish().as_ref()).await.unwrap();
                            s.shutdown().await.unwrap();
                        } else {
                            // Source: send 1 GiB, then the digest after it.
                            let chunk = pattern_chunk(2);
                            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                            let mut sent = 0;
                            while sent < GIB {
                                s.write_all(&chunk).await.unwrap();
                                ctx.update(&chunk);
                                sent += chunk.len() as u64;
                            }
                            s.write_all(ctx.finish().as_ref()).await.unwrap();
                            s.shutdown().await.unwrap();
                        }
                    });
                }
            });
            let t = Instant::now();
            blocking(|| {
                let mut c = TcpStream::connect(addr("198.18.3.3:1")).unwrap();
                let chunk = pattern_chunk(1);
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                let mut sent = 0;
                while sent < GIB {
                    c.write_all(&chunk).unwrap();
                    ctx.update(&chunk);
                    sent += chunk.len() as u64;
                }
                c.shutdown(Shutdown::Write).unwrap();
                let mut digest = Vec::new();
                c.read_to_end(&mut digest).unwrap();
                assert_eq!(digest, ctx.finish().as_ref(), "client → stack digest");
            })
            .await;
            eprintln!("1 GiB client → stack in {:?}", t.elapsed());
            let t = Instant::now();
            blocking(|| {
                let mut c = TcpStream::connect(addr("198.18.3.3:2")).unwrap();
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = 0u64;
                while got < GIB {
                    let want = buf.len().min((GIB - got) as usize);
                    let n = c.read(&mut buf[..want]).unwrap();
                    assert!(n > 0, "early EOF after {got} bytes");
                    ctx.update(&buf[..n]);
                    got += n as u64;
                }
                let mut digest = Vec::new();
                c.read_to_end(&mut digest).unwrap();
                assert_eq!(digest, ctx.finish().as_ref(), "stack → client digest");
            })
            .await;
            eprintln!("1 GiB stack → client in {:?}", t.elapsed());
        },
    );
}

#[test]
fn thousand_concurrent_flows_complete() {
    in_netns(
        "thousand_concurrent_flows_complete",
        |_| {},
        |stack| async move {
            let handle = spawn_echo(stack);
            let mut tasks = Vec::new();
            for i in 0..1000u32 {
                tasks.push(tokio::spawn(async move {
                    let target = format!("198.18.{}.{}:{}", 10 + i % 4, 1 + i % 200, 1000 + i % 7);
                    let mut c = tokio::net::TcpStream::connect(addr(&target)).await.unwrap();
                    let msg: Vec<u8> = (0..4096u32).map(|j| (i + j) as u8).collect();
                    c.write_all(&msg).await.unwrap();
                    c.shutdown().await.unwrap();
                    let mut back = Vec::new();
                    c.read_to_end(&mut back).await.unwrap();
                    assert_eq!(back, msg);
                }));
            }
            for t in tasks {
                tokio::time::timeout(Duration::from_secs(60), t)
                    .await
                    .unwrap()
                    .unwrap();
            }
            let stats = handle.stats();
            assert_eq!(stats.accepted, 1000);
            assert_eq!(stats.refused_over_cap, 0);
            // The kernel queued every packet for the stack: none dropped
            // at the tun (its default queue of 500 overflowed here).
            let (queue, dropped) = tun_queue_and_drops();
            assert_eq!(queue, 10_000, "the tun's txqueuelen");
            assert_eq!(dropped, 0, "packets the kernel dropped at the tun");
            // Closed flows are reaped without lingering in TIME-WAIT.
            let deadline = Instant::now() + Duration::from_secs(5);
            while handle.stats().active_flows > 0 {
                assert!(
                    Instant::now() < deadline,
                    "flows left: {:?}",
                    handle.stats()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    );
}

#[test]
fn flow_cap_refuses_the_excess() {
    in_netns(
        "flow_cap_refuses_the_excess",
        |c| c.max_flows = 10,
        |mut stack| async move {
            let handle = stack.handle();
            let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let held2 = held.clone();
            tokio::spawn(async move {
                while let Some(flow) = stack.next_flow().await {
                    let s = flow.accept().await.unwrap();
                    held2.lock().unwrap().push(s);
                }
            });
            let clients = blocking(|| {
                let mut clients = Vec::new();
                for i in 0..10 {
                    clients
                        .push(TcpStream::connect(addr(&format!("198.18.4.{}:80", i + 1))).unwrap());
                }
                let t = Instant::now();
                let err = TcpStream::connect(addr("198.18.4.200:80")).unwrap_err();
                assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
                assert!(t.elapsed() < Duration::from_millis(500));
                clients
            })
            .await;
            assert_eq!(handle.stats().refused_over_cap, 1);
            assert_eq!(handle.stats().active_flows, 10);
            // Freeing flows makes room again.
            while held.lock().unwrap().len() < 10 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(clients);
            held.lock().unwrap().clear();
            let deadline = Instant::now() + Duration::from_secs(5);
            while handle.stats().active_flows > 0 {
                assert!(
                    Instant::now() < deadline,
                    "flows not reaped: {:?}",
                    handle.stats()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            blocking(|| TcpStream::connect(addr("198.18.4.200:80")).unwrap()).await;
        },
    );
}

#[test]
fn idle_flows_are_reaped() {
    in_netns(
        "idle_flows_are_reaped",
        |c| c.idle_timeout = Some(Duration::from_millis(500)),
        |mut stack| async move {
            let handle = stack.handle();
            tokio::spawn(async move {
                while let Some(flow) = stack.next_flow().await {
                    let s = flow.accept().await.unwrap();
                    // Hold the stream and never use it.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        drop(s);
                    });
                }
            });
            let err = blocking(|| {
                let mut c = TcpStream::connect(addr("198.18.5.5:80")).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 1];
                c.read(&mut buf).unwrap_err().kind()
            })
            .await;
            assert_eq!(err, ErrorKind::ConnectionReset);
            assert_eq!(handle.stats().reaped_idle, 1);
        },
    );
}

fn http_response(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn serve_http(flow: IncomingFlow) {
    let dst = flow.dst();
    let mut s = flow.accept().await.unwrap();
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            return;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    s.write_all(http_response(&format!("hello from {dst}: {line}\n")).as_bytes())
        .await
        .unwrap();
    s.shutdown().await.unwrap();
}

#[test]
fn curl_gets_an_http_response() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIP curl_gets_an_http_response: curl is not installed");
        return;
    }
    in_netns(
        "curl_gets_an_http_response",
        |_| {},
        |mut stack| async move {
            tokio::spawn(async move {
                while let Some(flow) = stack.next_flow().await {
                    tokio::spawn(serve_http(flow));
                }
            });
            for target in ["198.18.6.1:8080", "198.18.6.2:80"] {
                let out = tokio::process::Command::new("curl")
                    .args(["-sS", "--max-time", "5", &format!("http://{target}/path")])
                    .output()
                    .await
                    .unwrap();
                assert!(
                    out.status.success(),
                    "curl: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    format!("hello from {target}: GET /path HTTP/1.1\n")
                );
            }
        },
    );
}

#[test]
fn udp_hook_answers_datagrams() {
    in_netns(
        "udp_hook_answers_datagrams",
        |c| c.udp_ports = vec![53],
        |stack| async move {
            let (_flows, mut datagrams, _handle) = stack.into_parts();
            tokio::spawn(async move {
                while let Some(d) = datagrams.next().await {
                    let mut answer = b"answer:".to_vec();
                    answer.extend_from_slice(&d.payload);
                    d.reply(&answer).unwrap();
                }
            });
            let got = blocking(|| {
                let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                sock.send_to(b"query", "198.18.0.53:53").unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                (buf[..n].to_vec(), from)
            })
            .await;
            assert_eq!(got.0, b"answer:query");
            assert_eq!(got.1, addr("198.18.0.53:53"));
        },
    );
}
