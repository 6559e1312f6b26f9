//! The tokio side: one task owns the [`Engine`] and the tun device, reads
//! packets, polls, writes packets, and hands events to the caller.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use tun_rs::AsyncDevice;

use crate::config::{Ipv4Range, StackConfig};
use crate::engine::{Counters, Engine, Event};
use crate::error::{ConfigError, StackError};
use crate::flow::{Command, IncomingFlow};
use crate::udp::{UdpDatagram, UdpSender};

/// Most packets read from the tun before the stack polls smoltcp and writes.
const READ_BATCH: usize = 64;
/// Most commands handled per round.
const COMMAND_BATCH: usize = 1024;

/// Packets the kernel queues for the stack to read before it drops them
/// (the tun's `txqueuelen`; Linux's default for a tun is 500). Every app
/// connection writing at once (a pool waking, 30,000 held connections each
/// sent a byte) queues a packet each faster than one task reads them; a
/// dropped packet waits for its sender's retransmission, 200 ms and then
/// doubling, so a burst past 500 left thousands of connections silent for
/// seconds. Each queued packet holds only its own bytes, and one bulk
/// connection cannot fill the queue (the kernel bounds what a socket has
/// queued below it, 1 MiB by default).
const TUN_QUEUE: u32 = 10_000;

/// Creates a tun device named `name` (for example `hl0`) with the given MTU,
/// up, without addresses: route the virtual ranges into it afterwards.
/// Needs CAP_NET_ADMIN in the current network namespace.
pub fn create_tun(name: &str, mtu: u16) -> Result<AsyncDevice, StackError> {
    tun_rs::DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .tx_queue_len(TUN_QUEUE)
        .build_async()
        .map_err(|source| StackError::CreateTun {
            name: name.to_owned(),
            source,
        })
}

/// A running stack: smoltcp terminating TCP flows that arrive on a tun.
///
/// Create it with [`Netstack::spawn`], then take decisions on
/// [`next_flow`](Self::next_flow) and answer
/// [`next_datagram`](Self::next_datagram). Dropping it (and every
/// [`StackHandle`]) does not stop the task while streams are open; call
/// [`StackHandle::shutdown`] for that.
#[derive(Debug)]
pub struct Netstack {
    flows: IncomingFlows,
    datagrams: Datagrams,
    handle: StackHandle,
}

/// The stream of new flows, waiting for a decision each.
#[derive(Debug)]
pub struct IncomingFlows(mpsc::UnboundedReceiver<IncomingFlow>);

impl IncomingFlows {
    /// The next new flow; `None` once the stack stopped.
    pub async fn next(&mut self) -> Option<IncomingFlow> {
        self.0.recv().await
    }
}

/// The stream of datagrams to the hooked UDP ports.
#[derive(Debug)]
pub struct Datagrams(mpsc::Receiver<UdpDatagram>);

impl Datagrams {
    /// The next datagram; `None` once the stack stopped.
    pub async fn next(&mut self) -> Option<UdpDatagram> {
        self.0.recv().await
    }
}

/// Controls a running stack and reads its counters. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StackHandle {
    cmd: mpsc::UnboundedSender<Command>,
    counters: Arc<Counters>,
    udp: UdpSender,
    stopped: watch::Receiver<Option<Result<(), Arc<StackError>>>>,
}

/// A snapshot of a stack's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Flows waiting for the caller's decision.
    pub pending_flows: u64,
    /// Accepted flows the stack still tracks (including closing ones).
    pub active_flows: u64,
    /// Flows accepted so far.
    pub accepted: u64,
    /// Flows refused by the caller or because nobody decided in time.
    pub refused: u64,
    /// SYNs refused because the flow cap was reached.
    pub refused_over_cap: u64,
    /// Flows refused because no decision came in time.
    pub expired: u64,
    /// Established flows reset for being idle too long.
    pub reaped_idle: u64,
    /// Packets from the tun dropped as malformed or not for us.
    pub dropped_packets: u64,
    /// Of those, packets from a source not in [`StackConfig::sources`].
    pub dropped_foreign: u64,
    /// Hooked datagrams dropped because the caller did not keep up.
    pub dropped_datagrams: u64,
}

impl StackHandle {
    /// The current counters.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            pending_flows: get(&c.pending),
            active_flows: get(&c.active),
            accepted: get(&c.accepted),
            refused: get(&c.refused),
            refused_over_cap: get(&c.refused_over_cap),
            expired: get(&c.expired),
            reaped_idle: get(&c.reaped_idle),
            dropped_packets: get(&c.dropped_packets),
            dropped_foreign: get(&c.dropped_foreign),
            dropped_datagrams: get(&c.dropped_datagrams),
        }
    }

    /// A sender for UDP datagrams from virtual addresses.
    pub fn udp_sender(&self) -> UdpSender {
        self.udp.clone()
    }

    /// Takes packets only from `sources` from now on (`None`: from any
    /// source); see [`StackConfig::sources`]. Flows already accepted from a
    /// source no longer listed lose their packets.
    pub fn set_sources(&self, sources: Option<Vec<Ipv4Range>>) {
        let _ = self.cmd.send(Command::SetSources(sources));
    }

    /// Stops the stack: every flow is reset and the task ends.
    pub fn shutdown(&self) {
        let _ = self.cmd.send(Command::Shutdown);
    }

    /// Waits until the stack task ended, and says why: `Ok` after
    /// [`shutdown`](Self::shutdown), an error if the tun failed.
    pub async fn stopped(&self) -> Result<(), Arc<StackError>> {
        let mut rx = self.stopped.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Ok(())),
            // The task is gone without a word: it panicked or was cancelled.
            Err(_) => Ok(()),
        }
    }
}

impl Netstack {
    /// Starts the stack task on the current tokio runtime, reading and
    /// writing `device` (see [`create_tun`]; any tun-rs device will do, for
    /// example one adopted from a file descriptor).
    pub fn spawn(device: AsyncDevice, config: StackConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (flows_tx, flows_rx) = mpsc::unbounded_channel();
        let (dgram_tx, dgram_rx) = mpsc::channel(config.udp_queue);
        let (stopped_tx, stopped_rx) = watch::channel(None);
        let counters = Arc::new(Counters::default());
        let ranges: Arc<[Ipv4Range]> = config.ranges.clone().into();
        let udp = UdpSender::new(cmd_tx.clone(), ranges, config.mtu);
        info!(
            ranges = ?config.ranges,
            mtu = config.mtu,
            max_flows = config.max_flows,
            "netstack starting"
        );
        let engine = Engine::new(
            config,
            cmd_tx.clone(),
            counters.clone(),
            smoltcp::time::Instant::now(),
        );
        let task = StackTask {
            engine,
            tun: device,
            cmd_rx,
            cmd_tx: cmd_tx.clone(),
            flows_tx,
            dgram_tx,
            udp: udp.clone(),
            counters: counters.clone(),
        };
        tokio::spawn(async move {
            let result = task.run().await;
            match &result {
                Ok(()) => info!("netstack stopped"),
                Err(e) => warn!(error = %e, "netstack stopped"),
            }
            let _ = stopped_tx.send(Some(result.map_err(Arc::new)));
        });
        Ok(Self {
            flows: IncomingFlows(flows_rx),
            datagrams: Datagrams(dgram_rx),
            handle: StackHandle {
                cmd: cmd_tx,
                counters,
                udp,
                stopped: stopped_rx,
            },
        })
    }

    /// The next new flow to accept or refuse; `None` once the stack stopped.
    pub async fn next_flow(&mut self) -> Option<IncomingFlow> {
        self.flows.next().await
    }

    /// The next datagram to a hooked UDP port; `None` once the stack stopped.
    pub async fn next_datagram(&mut self) -> Option<UdpDatagram> {
        self.datagrams.next().await
    }

    /// A handle to control the stack.
    pub fn handle(&self) -> StackHandle {
        self.handle.clone()
    }

    /// Splits the stack into its parts, to serve flows and datagrams from
    /// different tasks.
    pub fn into_parts(self) -> (IncomingFlows, Datagrams, StackHandle) {
        (self.flows, self.datagrams, self.handle)
    }
}

struct StackTask {
    engine: Engine,
    tun: AsyncDevice,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    cmd_tx: mpsc::UnboundedSender<Command>,
    flows_tx: mpsc::UnboundedSender<IncomingFlow>,
    dgram_tx: mpsc::Sender<UdpDatagram>,
    udp: UdpSender,
    counters: Arc<Counters>,
}

impl StackTask {
    async fn run(mut self) -> Result<(), StackError> {
        loop {
            let now = smoltcp::time::Instant::now();
            for _ in 0..COMMAND_BATCH {
                match self.cmd_rx.try_recv() {
                    Ok(cmd) => {
                        if !self.engine.handle_command(cmd, now) {
                            return self.shut_down(now);
                        }
                    }
                    Err(_) => break,
                }
            }

            let mut more = false;
            for i in 0..READ_BATCH {
                let mut buf = self.engine.take_buffer();
                match self.tun.try_recv(&mut buf) {
                    Ok(n) => self.engine.handle_packet(buf, n, now),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.engine.recycle(buf);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        self.engine.recycle(buf);
                    }
                    Err(e) => return Err(StackError::TunIo(e)),
                }
                if i + 1 == READ_BATCH {
                    more = true;
                }
            }

            self.engine.poll(now);
            self.deliver_events();
            let want_write = self.flush()?;

            if more {
                tokio::task::yield_now().await;
                continue;
            }
            let deadline = self.engine.poll_at(now);
            let wait = if deadline <= now {
                tokio::task::yield_now().await;
                continue;
            } else {
                std::time::Duration::from_micros((deadline - now).total_micros())
            };
            tokio::select! {
                r = self.tun.readable() => r.map_err(StackError::TunIo)?,
                cmd = self.cmd_rx.recv() => {
                    // The stack holds a sender itself, so the channel never closes.
                    if let Some(cmd) = cmd
                        && !self.engine.handle_command(cmd, smoltcp::time::Instant::now())
                    {
                        return self.shut_down(smoltcp::time::Instant::now());
                    }
                }
                r = self.tun.writable(), if want_write => r.map_err(StackError::TunIo)?,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn deliver_events(&mut self) {
        while let Some(event) = self.engine.poll_event() {
            match event {
                Event::NewFlow { id, src, dst } => {
                    let flow = IncomingFlow::new(id, src, dst, self.cmd_tx.clone());
                    // Nobody listening: the returned flow is dropped, which
                    // refuses it.
                    let _ = self.flows_tx.send(flow);
                }
                Event::Datagram { src, dst, payload } => {
                    let d = UdpDatagram::new(src, dst, payload, self.udp.clone());
                    if self.dgram_tx.try_send(d).is_err() {
                        self.counters
                            .dropped_datagrams
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Writes queued packets into the tun. Returns true if the tun is full.
    fn flush(&mut self) -> Result<bool, StackError> {
        while let Some(packet) = self.engine.peek_transmit() {
            match self.tun.try_send(packet) {
                Ok(_) => self.engine.pop_transmit(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The kernel refused this one packet (bad length, no route
                // for a reply); the next may well go through.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc_errno::EINVAL | libc_errno::EMSGSIZE | libc_errno::EIO)
                    ) =>
                {
                    debug!(error = %e, "tun refused a packet");
                    self.engine.pop_transmit();
                }
                Err(e) => return Err(StackError::TunIo(e)),
            }
        }
        Ok(false)
    }

    fn shut_down(mut self, now: smoltcp::time::Instant) -> Result<(), StackError> {
        self.engine.reset_all(now);
        self.flush()?;
        Ok(())
    }
}

/// The errno values `flush` tolerates (Linux numbering).
mod libc_errno {
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const EMSGSIZE: i32 = 90;
}
