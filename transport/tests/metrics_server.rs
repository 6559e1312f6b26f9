//! The metrics server goes on serving after `accept` fails. Alone in its
//! test binary: it runs the process out of open files.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

fn get(addr: SocketAddr) -> String {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn a_scraper_queued_while_accept_fails_for_lack_of_files_is_answered_later() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let addr = runtime
        .block_on(transport::metrics::serve(
            "127.0.0.1:0".parse().unwrap(),
            || "up 1\n".to_string(),
        ))
        .unwrap();

    // Take every file the process may open, then give one back for a
    // client: its connection waits in the listener's queue, and accepting
    // it fails with EMFILE. (No request comes before: the server's end of
    // it might close later and leave a file free.)
    let limit = getrlimit(Resource::Nofile);
    let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(open_now + 32),
            maximum: limit.maximum,
        },
    )
    .unwrap();
    let mut hogs = Vec::new();
    let exhausted = loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => hogs.push(file),
            Err(e) => break e,
        }
    };
    assert_eq!(exhausted.raw_os_error(), Some(Errno::MFILE.raw_os_error()));
    hogs.pop();
    let asked = Instant::now();
    let mut waiting = TcpStream::connect(addr).unwrap();
    waiting
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(hogs);
    setrlimit(Resource::Nofile, limit).unwrap();

    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    waiting.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nup 1\n"), "{answer}");
    // axum waits a second after a failed accept: the answer came after it,
    // so the accept did fail.
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "{:?}",
        asked.elapsed()
    );
    assert!(get(addr).starts_with("HTTP/1.1 200 OK\r\n"));
}
