//! The in-memory device smoltcp runs on: two packet queues. The stack task
//! fills `rx` with packets read from the tun and drains `tx` into it; tokens
//! never make a syscall or take a lock. Packet buffers are recycled through a
//! small pool so the hot path does not allocate.

use std::collections::VecDeque;

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Most spare buffers kept for reuse.
const POOL_MAX: usize = 256;

/// A packet in a buffer of `mtu` bytes; only the first `len` are the packet.
#[derive(Debug)]
pub(crate) struct Packet {
    pub buf: Vec<u8>,
    pub len: usize,
}

impl Packet {
    pub fn bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&self.buf)
    }
}

/// Two queues of whole IP packets and a pool of spare buffers.
#[derive(Debug)]
pub(crate) struct QueueDevice {
    pub rx: VecDeque<Packet>,
    pub tx: VecDeque<Packet>,
    rx_pool: Vec<Vec<u8>>,
    tx_pool: Vec<Vec<u8>>,
    mtu: usize,
    checksum: ChecksumCapabilities,
}

impl QueueDevice {
    pub fn new(mtu: usize, checksum: ChecksumCapabilities) -> Self {
        Self {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            rx_pool: Vec::new(),
            tx_pool: Vec::new(),
            mtu,
            checksum,
        }
    }

    /// A buffer of `mtu` bytes to read a packet into.
    pub fn take_buffer(&mut self) -> Vec<u8> {
        take(&mut self.rx_pool, self.mtu)
    }

    /// Gives back a buffer taken with [`Self::take_buffer`] but not queued.
    pub fn recycle_rx(&mut self, buf: Vec<u8>) {
        recycle(&mut self.rx_pool, buf, self.mtu);
    }

    /// Gives back the buffer of a transmitted packet.
    pub fn recycle_tx(&mut self, buf: Vec<u8>) {
        recycle(&mut self.tx_pool, buf, self.mtu);
    }
}

fn take(pool: &mut Vec<Vec<u8>>, mtu: usize) -> Vec<u8> {
    pool.pop().unwrap_or_else(|| vec![0u8; mtu])
}

fn recycle(pool: &mut Vec<Vec<u8>>, buf: Vec<u8>, mtu: usize) {
    if pool.len() < POOL_MAX && buf.len() == mtu {
        pool.push(buf);
    }
}

impl phy::Device for QueueDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        let Self {
            tx,
            rx_pool,
            tx_pool,
            mtu,
            ..
        } = self;
        Some((
            RxToken {
                packet,
                pool: rx_pool,
                mtu: *mtu,
            },
            TxToken {
                tx,
                pool: tx_pool,
                mtu: *mtu,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            tx: &mut self.tx,
            pool: &mut self.tx_pool,
            mtu: self.mtu,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps.checksum = self.checksum.clone();
        caps
    }
}

/// One received packet.
#[derive(Debug)]
pub(crate) struct RxToken<'a> {
    packet: Packet,
    pool: &'a mut Vec<Vec<u8>>,
    mtu: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let r = f(self.packet.bytes());
        recycle(self.pool, self.packet.buf, self.mtu);
        r
    }
}

/// Room for one packet to transmit.
#[derive(Debug)]
pub(crate) struct TxToken<'a> {
    tx: &'a mut VecDeque<Packet>,
    pool: &'a mut Vec<Vec<u8>>,
    mtu: usize,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = if len <= self.mtu {
            take(self.pool, self.mtu)
        } else {
            // smoltcp never emits more than the MTU; be safe anyway.
            vec![0u8; len]
        };
        let len = len.min(buf.len());
        let out = &mut buf[..len];
        // Clear so no byte of an earlier packet can leak into this one.
        out.fill(0);
        let r = f(out);
        self.tx.push_back(Packet { buf, len });
        r
    }
}
