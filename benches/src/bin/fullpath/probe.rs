//! The load generators and the target server of the full-path benchmark.
//! The harness runs them inside the lab's namespaces as
//! `fullpath probe <what> ...`; each prints one JSON object on stdout.
//!
//! - `greet LISTEN...`: the target, on one address or more. Writes one
//!   byte to every connection it accepts, then sends back whatever it
//!   reads until the peer closes. Binds with `SO_REUSEPORT`, so several
//!   can share a port (and the connections, when one process may not hold
//!   them all).
//! - `latency TARGET COUNT`: COUNT fresh connections one after another, each
//!   timed from `connect` to the greeting byte.
//! - `rate TARGET SECS WORKERS`: connections (connect, greeting, close) per
//!   second with WORKERS at a time.
//! - `hold TARGET COUNT`: opens COUNT connections, waits for each greeting,
//!   prints a first JSON line, and holds them until stdin closes; each line
//!   `check` on stdin sends a byte on every connection held and prints how
//!   many sent it back.
//! - `dns SERVER NAME SECS WORKERS`: A queries per second answered.
//! - `resolve SERVER NAME`: the first A record SERVER answers for NAME.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::json;

/// How long one connection may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn main(args: &[String]) -> Result<()> {
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("probe {}: missing argument {i}", args[0]))
    };
    let num = |i: usize| -> Result<u64> {
        arg(i)?
            .parse()
            .with_context(|| format!("probe {}: argument {i} is not a number", args[0]))
    };
    let addr = |i: usize| -> Result<SocketAddr> {
        arg(i)?
            .parse()
            .with_context(|| format!("probe {}: argument {i} is not an address", args[0]))
    };
    let out = match args.first().map(String::as_str) {
        Some("greet") => {
            let listen = args[1..]
                .iter()
                .map(|a| {
                    a.parse()
                        .with_context(|| format!("{a:?} is not an address"))
                })
                .collect::<Result<Vec<SocketAddr>>>()?;
            return greet(listen);
        }
        Some("latency") => latency(addr(1)?, num(2)?)?,
        Some("rate") => rate(addr(1)?, num(2)?, num(3)?)?,
        Some("hold") => return hold(addr(1)?, num(2)?),
        Some("dns") => dns(addr(1)?, arg(2)?, num(3)?, num(4)?)?,
        Some("resolve") => resolve(addr(1)?, arg(2)?)?,
        other => bail!("unknown probe {other:?}"),
    };
    println!("{out}");
    Ok(())
}

#[tokio::main]
async fn greet(listen: Vec<SocketAddr>) -> Result<()> {
    let mut listeners = Vec::new();
    for addr in listen {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        listeners.push(socket.listen(4096)?);
    }
    let mut accepting = tokio::task::JoinSet::new();
    for listener in listeners {
        accepting.spawn(serve_greetings(listener));
    }
    match accepting.join_next().await {
        Some(ended) => ended?,
        None => bail!("greet: no address to listen on"),
    }
}

async fn serve_greetings(listener: tokio::net::TcpListener) -> Result<()> {
    loop {
        let (mut conn, _) = listener.accept().await?;
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = conn.set_nodelay(true);
            if conn.write_all(b"!").await.is_err() {
                return;
            }
            let mut buf = [0u8; 512];
            while let Ok(n) = conn.read(&mut buf).await {
                if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// One connection up to its greeting byte.
fn greeted(target: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte)?;
    if byte != *b"!" {
        bail!("unexpected greeting {byte:?}");
    }
    Ok(s)
}

/// [`greeted`], retried twice after a short pause: thousands of connections
/// opened at once can overflow a listener's backlog for a moment, and the
/// idle-memory figure is about holding them, not about that.
fn greeted_retrying(target: SocketAddr) -> Result<TcpStream> {
    let mut tries = 0;
    loop {
        match greeted(target) {
            Err(_) if tries < 2 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

/// Failures in a row after which a probe gives up on a path: one that
/// stopped answering would otherwise cost a timeout per remaining probe
/// (2,000 of them: hours).
const GIVE_UP_AFTER: u64 = 10;

fn latency(target: SocketAddr, count: u64) -> Result<serde_json::Value> {
    let mut times = Vec::with_capacity(count as usize);
    let mut failures = 0u64;
    let mut in_a_row = 0u64;
    let mut first_error = None;
    for _ in 0..count {
        let start = Instant::now();
        match greeted(target) {
            Ok(_) => {
                times.push(start.elapsed());
                in_a_row = 0;
            }
            Err(e) => {
                failures += 1;
                in_a_row += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
                if in_a_row >= GIVE_UP_AFTER {
                    break;
                }
            }
        }
    }
    if times.is_empty() {
        bail!("no connection to {target} succeeded: {first_error:?}");
    }
    if in_a_row >= GIVE_UP_AFTER {
        bail!(
            "the path stopped answering: {} of {count} probes answered, then {GIVE_UP_AFTER} failed in a row: {first_error:?}",
            times.len()
        );
    }
    times.sort();
    let pct = |p: f64| {
        let i = ((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1;
        times[i].as_secs_f64() * 1e3
    };
    Ok(json!({
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "ok": times.len(),
        "failures": failures,
        "first_error": first_error,
    }))
}

fn rate(target: SocketAddr, secs: u64, workers: u64) -> Result<serde_json::Value> {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match greeted(target) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    if ok == 0 {
        bail!("no connection to {target} succeeded in {secs} s");
    }
    Ok(json!({
        "per_sec": ok as f64 / elapsed,
        "ok": ok,
        "failures": failed.load(Ordering::Relaxed),
    }))
}

/// Opens `count` connections from a few threads, reports, and holds them
/// until stdin reaches its end.
fn hold(target: SocketAddr, count: u64) -> Result<()> {
    const THREADS: u64 = 16;
    // Opening 10,000 takes seconds on a working path; a path answering
    // each connection only near its timeout would take hours. 6 ms each
    // (five minutes for 50,000) leaves room for a netstack that slows as
    // flows add up, and bounds what a full run spends on a count a path
    // cannot hold.
    let deadline = Duration::from_secs(120).max(Duration::from_millis(6) * count as u32);
    let start = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let mine = count / THREADS + u64::from(t < count % THREADS);
            // A thread that fails keeps what it opened: the count held
            // is what the report shows.
            std::thread::spawn(move || -> (Vec<TcpStream>, Option<anyhow::Error>) {
                let mut held = Vec::with_capacity(mine as usize);
                for _ in 0..mine {
                    if start.elapsed() > deadline {
                        let e = anyhow::anyhow!("gave up after {} s", deadline.as_secs());
                        return (held, Some(e));
                    }
                    match greeted_retrying(target) {
                        Ok(s) => held.push(s),
                        Err(e) => return (held, Some(e)),
                    }
                }
                (held, None)
            })
        })
        .collect();
    let mut held = Vec::with_capacity(count as usize);
    let mut first_error = None;
    for t in threads {
        let (mine, error) = t.join().expect("hold thread");
        held.extend(mine);
        if let Some(e) = error {
            first_error.get_or_insert_with(|| format!("{e:#}"));
        }
    }
    println!(
        "{}",
        json!({
            "held": held.len(),
            "secs": start.elapsed().as_secs_f64(),
            "first_error": first_error,
        })
    );
    std::io::stdout().flush()?;
    for line in std::io::stdin().lines() {
        if line?.trim() == "check" {
            let start = Instant::now();
            let answered = answering(&held);
            println!(
                "{}",
                json!({
                    "answered": answered,
                    "of": held.len(),
                    "secs": start.elapsed().as_secs_f64(),
                })
            );
            std::io::stdout().flush()?;
        }
    }
    drop(held);
    Ok(())
}

/// How many of `held` send back a byte written to them: the byte goes out
/// on every connection first, then each answer is awaited (up to
/// [`CONNECT_TIMEOUT`] each, all within a deadline that grows with the
/// count), a few threads sharing the work.
fn answering(held: &[TcpStream]) -> u64 {
    const THREADS: usize = 16;
    let deadline =
        Instant::now() + Duration::from_secs(30) + Duration::from_millis(2) * held.len() as u32;
    let answered = AtomicU64::new(0);
    let chunk = held.len().div_ceil(THREADS).max(1);
    std::thread::scope(|scope| {
        for part in held.chunks(chunk) {
            let answered = &answered;
            scope.spawn(move || {
                let sent: Vec<&TcpStream> = part
                    .iter()
                    .filter(|s| {
                        let mut s: &TcpStream = s;
                        s.write_all(b"?").is_ok()
                    })
                    .collect();
                for mut s in sent {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero()
                        || s.set_read_timeout(Some(left.min(CONNECT_TIMEOUT))).is_err()
                    {
                        break;
                    }
                    let mut byte = [0u8; 1];
                    if s.read_exact(&mut byte).is_ok() && byte == *b"?" {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    answered.into_inner()
}

/// An A query for `name` with id `id`, recursion desired.
fn dns_query(id: u16, name: &Name) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name.clone(), RecordType::A));
    message.to_vec().expect("a query encodes")
}

/// The A records of an answer to query `id`, or `None` if it is not one.
fn a_records(id: u16, answer: &[u8]) -> Option<Vec<Ipv4Addr>> {
    let m = Message::from_vec(answer).ok()?;
    if m.metadata.id != id || m.metadata.response_code != ResponseCode::NoError {
        return None;
    }
    Some(
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect(),
    )
}

fn name(s: &str) -> Result<Name> {
    Name::from_ascii(s).with_context(|| format!("{s:?} is not a DNS name"))
}

fn dns(server: SocketAddr, host: &str, secs: u64, workers: u64) -> Result<serde_json::Value> {
    let qname = name(host)?;
    let answered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let (answered, failed, qname) = (answered.clone(), failed.clone(), qname.clone());
            std::thread::spawn(move || -> Result<()> {
                let sock = UdpSocket::bind("127.0.0.1:0")?;
                sock.connect(server)?;
                sock.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut buf = [0u8; 4096];
                let mut id = (w as u16).wrapping_mul(4099);
                while Instant::now() < deadline {
                    id = id.wrapping_add(1);
                    sock.send(&dns_query(id, &qname))?;
                    // An answer to this query with at least one A record; a
                    // late answer to an earlier one is skipped.
                    let good = loop {
                        match sock.recv(&mut buf) {
                            Ok(n) if n >= 2 && buf[..2] == id.to_be_bytes() => {
                                break a_records(id, &buf[..n]).is_some_and(|a| !a.is_empty());
                            }
                            Ok(_) => continue,
                            Err(_) => break false,
                        }
                    };
                    if good {
                        answered.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().expect("dns thread")?;
    }
    let answered = answered.load(Ordering::Relaxed);
    if answered == 0 {
        bail!("{server} answered no query for {host}");
    }
    Ok(json!({
        "per_sec": answered as f64 / secs as f64,
        "failures": failed.load(Ordering::Relaxed),
    }))
}

fn resolve(server: SocketAddr, host: &str) -> Result<serde_json::Value> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send(&dns_query(7, &name(host)?))?;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf)?;
    match a_records(7, &buf[..n]).and_then(|a| a.first().copied()) {
        Some(ip) => Ok(json!({ "address": ip.to_string() })),
        None => bail!("{server} has no A record for {host}"),
    }
}
