//! The control channel as a state machine: bytes and the time in; messages,
//! bytes out and deadlines out.
//!
//! [`Channel`] is what both ends share: the length-prefixed codec of
//! [`crate::control`], keep-alives answered and sent, and the three ways a
//! channel is declared dead:
//!
//! - **silence**: nothing received for [`Timing::idle`];
//! - **a keep-alive left unanswered** for [`Timing::idle`]: the other side
//!   may still be sending, but it is not reading what we send;
//! - **a stalled or overlong write queue**: bytes handed to the driver not
//!   written within [`Timing::idle`], or more than [`Timing::max_backlog`]
//!   bytes waiting. Nothing queued is ever dropped on its own: a channel
//!   that cannot deliver a message is closed, and the peer reconnects and
//!   starts again from a clean state.
//!
//! On top of it, [`PeerSession`] is the side of an agent or sender
//! (`Hello`, wait for `Welcome`, attach every hybrid connection, renew the
//! tokens before they expire) and [`RelaySession`] the relay's side (wait
//! for `Hello` within the handshake deadline, small messages and a bounded
//! number of tokens until one attaches, an attach deadline). A driver with
//! real sockets lives in `transport::control`; the tests below drive both
//! sides through memory with a fake clock.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::connection_string::ConnectionString;
use crate::control::{
    self, ControlError, Fingerprint, MAX_MESSAGE_LEN, PRE_AUTH_MAX_MESSAGE_LEN, PROTOCOL_VERSION,
    PeerMessage, PeerRole, RelayMessage,
};
use crate::label::PeerLabel;

/// How often a keep-alive is sent.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A channel that heard nothing, or had a keep-alive or a write outstanding,
/// for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// From the first byte to the hello (relay) or the welcome (peer).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the welcome, a channel must attach to a hybrid connection (present
/// a token that verifies) within this, or the relay closes it.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Tokens (`Attach`, `Renew`, `Describe`) a channel may present before one
/// attaches; one more closes it. Each refusal is a log line at the relay,
/// so a stranger must not be able to send them without end.
pub const MAX_TOKENS_BEFORE_AUTH: u32 = 64;
/// Bytes that may wait to be written before the channel is closed. A
/// healthy channel drains in milliseconds; this is a few thousand
/// `Agents`/`Grant` messages, far more than any burst the relay sends.
pub const MAX_BACKLOG: usize = 4 << 20;

/// The clocks of a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// A keep-alive is sent this often.
    pub keepalive: Duration,
    /// Silence, an unanswered keep-alive or a stalled write this long ends
    /// the channel.
    pub idle: Duration,
    /// Bytes waiting to be written past this end the channel.
    pub max_backlog: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            keepalive: KEEPALIVE_INTERVAL,
            idle: IDLE_TIMEOUT,
            max_backlog: MAX_BACKLOG,
        }
    }
}

/// The keep-alive messages of a message type, which [`Channel`] handles
/// itself.
pub trait KeepAlive: Serialize + DeserializeOwned {
    /// A keep-alive request.
    fn ping(nonce: u64) -> Self;
    /// The answer to [`KeepAlive::ping`].
    fn pong(nonce: u64) -> Self;
    /// Which keep-alive this message is, if it is one.
    fn keepalive(&self) -> Option<Beat>;
}

/// A keep-alive message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beat {
    /// A request, to answer with the same nonce.
    Ping(u64),
    /// The answer to our request with this nonce.
    Pong(u64),
}

impl KeepAlive for PeerMessage {
    fn ping(nonce: u64) -> Self {
        PeerMessage::Ping { nonce }
    }
    fn pong(nonce: u64) -> Self {
        PeerMessage::Pong { nonce }
    }
    fn keepalive(&self) -> Option<Beat> {
        match self {
            PeerMessage::Ping { nonce } => Some(Beat::Ping(*nonce)),
            PeerMessage::Pong { nonce } => Some(Beat::Pong(*nonce)),
            _ => None,
        }
    }
}

impl KeepAlive for RelayMessage {
    fn ping(nonce: u64) -> Self {
        RelayMessage::Ping { nonce }
    }
    fn pong(nonce: u64) -> Self {
        RelayMessage::Pong { nonce }
    }
    fn keepalive(&self) -> Option<Beat> {
        match self {
            RelayMessage::Ping { nonce } => Some(Beat::Ping(*nonce)),
            RelayMessage::Pong { nonce } => Some(Beat::Pong(*nonce)),
            _ => None,
        }
    }
}

/// Why a channel ended.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Nothing arrived for too long.
    #[error("nothing heard for {0:?}")]
    Silent(Duration),
    /// Bytes arrive, but our keep-alive is not answered: the other side does
    /// not read.
    #[error("keep-alive unanswered for {0:?}: the other side is not reading")]
    Unanswered(Duration),
    /// The driver could not write for too long.
    #[error("could not write for {0:?}: the other side is not reading")]
    WriteStalled(Duration),
    /// Too much is waiting to be written.
    #[error(
        "{queued} bytes waiting to be sent, over the {max}-byte limit: the other side is not reading"
    )]
    Backlog {
        /// Bytes queued or being written.
        queued: usize,
        /// [`Timing::max_backlog`].
        max: usize,
    },
    /// A message that does not decode, or is too long.
    #[error("bad message: {0}")]
    Decode(#[from] ControlError),
}

/// One end of a control channel sending `S` and receiving `R`: framing,
/// keep-alives and liveness, without any I/O.
///
/// The driver feeds what it reads to [`Channel::receive`], writes what
/// [`Channel::poll_transmit`] gives it and reports progress with
/// [`Channel::transmitted`], and calls [`Channel::handle_timeout`] at
/// [`Channel::poll_timeout`].
#[derive(Debug)]
pub struct Channel<S, R> {
    timing: Timing,
    max_message: usize,
    inbound: BytesMut,
    outbound: BytesMut,
    /// Bytes handed to the driver and not yet reported written.
    in_flight: usize,
    /// While bytes are in flight: when the driver last made progress.
    writing_since: Option<Instant>,
    last_heard: Instant,
    next_ping: Instant,
    nonce: u64,
    /// Our keep-alives not yet answered, oldest first.
    unanswered: VecDeque<(u64, Instant)>,
    _messages: PhantomData<fn(S) -> R>,
}

impl<S: KeepAlive, R: KeepAlive> Channel<S, R> {
    /// A channel that starts at `now`, accepting messages up to
    /// [`MAX_MESSAGE_LEN`].
    pub fn new(timing: Timing, now: Instant) -> Self {
        Channel {
            timing,
            max_message: MAX_MESSAGE_LEN,
            inbound: BytesMut::new(),
            outbound: BytesMut::new(),
            in_flight: 0,
            writing_since: None,
            last_heard: now,
            next_ping: now + timing.keepalive,
            nonce: 0,
            unanswered: VecDeque::new(),
            _messages: PhantomData,
        }
    }

    /// Sets the largest message accepted from now on.
    pub fn set_max_message_len(&mut self, max: usize) {
        self.max_message = max;
    }

    /// Queues a message for the other side.
    pub fn send(&mut self, msg: &S) -> Result<(), ChannelError> {
        control::encode(msg, &mut self.outbound);
        let queued = self.outbound.len() + self.in_flight;
        if queued > self.timing.max_backlog {
            return Err(ChannelError::Backlog {
                queued,
                max: self.timing.max_backlog,
            });
        }
        Ok(())
    }

    /// Bytes read from the other side.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) {
        if !bytes.is_empty() {
            self.inbound.extend_from_slice(bytes);
            self.last_heard = now;
        }
    }

    /// The next message from the other side, if a whole one has arrived.
    /// Keep-alives are answered and consumed here.
    pub fn poll_message(&mut self) -> Result<Option<R>, ChannelError> {
        loop {
            let Some(msg) = control::decode_within::<R>(&mut self.inbound, self.max_message)?
            else {
                return Ok(None);
            };
            match msg.keepalive() {
                Some(Beat::Ping(nonce)) => self.send(&S::pong(nonce))?,
                Some(Beat::Pong(nonce)) => {
                    while self.unanswered.front().is_some_and(|(n, _)| *n <= nonce) {
                        self.unanswered.pop_front();
                    }
                }
                None => return Ok(Some(msg)),
            }
        }
    }

    /// Everything queued, for the driver to write; `None` if nothing is.
    /// The driver reports what it wrote with [`Channel::transmitted`].
    pub fn poll_transmit(&mut self, now: Instant) -> Option<BytesMut> {
        if self.outbound.is_empty() {
            return None;
        }
        if self.in_flight == 0 {
            self.writing_since = Some(now);
        }
        self.in_flight += self.outbound.len();
        Some(self.outbound.split())
    }

    /// The driver wrote `n` of the bytes it was given.
    pub fn transmitted(&mut self, n: usize, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(n);
        self.writing_since = (self.in_flight > 0).then_some(now);
    }

    /// Whether bytes are queued or being written.
    pub fn has_pending_writes(&self) -> bool {
        !self.outbound.is_empty() || self.in_flight > 0
    }

    /// When [`Channel::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Instant {
        let mut at = self.next_ping.min(self.last_heard + self.timing.idle);
        if let Some((_, sent)) = self.unanswered.front() {
            at = at.min(*sent + self.timing.idle);
        }
        if let Some(since) = self.writing_since {
            at = at.min(since + self.timing.idle);
        }
        at
    }

    /// Sends a keep-alive when one is due; fails when the channel is dead.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ChannelError> {
        let idle = self.timing.idle;
        if now >= self.last_heard + idle {
            return Err(ChannelError::Silent(idle));
        }
        if self
            .unanswered
            .front()
            .is_some_and(|(_, sent)| now >= *sent + idle)
        {
            return Err(ChannelError::Unanswered(idle));
        }
        if self.writing_since.is_some_and(|since| now >= since + idle) {
            return Err(ChannelError::WriteStalled(idle));
        }
        if now >= self.next_ping {
            self.nonce += 1;
            self.unanswered.push_back((self.nonce, now));
            self.send(&S::ping(self.nonce))?;
            self.next_ping = now + self.timing.keepalive;
        }
        Ok(())
    }
}

/// The time as a session sees it: the monotonic clock for its deadlines,
/// the wall clock (seconds since the Unix epoch) for the tokens it signs.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// For deadlines.
    pub now: Instant,
    /// For token expiry.
    pub unix: u64,
}

/// What a driver needs of either side of a control channel.
pub trait Session {
    /// What the owner hands the session to send.
    type Command;
    /// What the session tells its owner.
    type Event;
    /// Why the session ended.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The channel underneath.
    fn channel_mut(&mut self) -> &mut dyn Transmit;
    /// Queues a command from the owner.
    fn command(&mut self, command: Self::Command) -> Result<(), Self::Error>;
    /// The next event, if any.
    fn poll_event(&mut self, clock: Clock) -> Result<Option<Self::Event>, Self::Error>;
    /// When [`Session::handle_timeout`] must next be called.
    fn poll_timeout(&self) -> Instant;
    /// Does what is due at `clock`.
    fn handle_timeout(&mut self, clock: Clock) -> Result<(), Self::Error>;
}

/// The byte-moving half of a [`Channel`], whatever its message types.
pub trait Transmit {
    /// See [`Channel::receive`].
    fn receive(&mut self, bytes: &[u8], now: Instant);
    /// See [`Channel::poll_transmit`].
    fn poll_transmit(&mut self, now: Instant) -> Option<BytesMut>;
    /// See [`Channel::transmitted`].
    fn transmitted(&mut self, n: usize, now: Instant);
}

impl<S: KeepAlive, R: KeepAlive> Transmit for Channel<S, R> {
    fn receive(&mut self, bytes: &[u8], now: Instant) {
        Channel::receive(self, bytes, now);
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<BytesMut> {
        Channel::poll_transmit(self, now)
    }
    fn transmitted(&mut self, n: usize, now: Instant) {
        Channel::transmitted(self, n, now);
    }
}

/// What the peer side of a control channel tells its owner.
#[derive(Debug, PartialEq)]
pub enum PeerEvent {
    /// The relay welcomed us; the attaches are queued.
    Up {
        /// The relay's id of this session.
        session: u64,
    },
    /// A message from the relay other than a keep-alive.
    Message(RelayMessage),
}

/// Why the peer side of a control channel ended.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The channel died.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// No welcome within [`HANDSHAKE_TIMEOUT`].
    #[error("the relay did not welcome us within {0:?}")]
    NoWelcome(Duration),
    /// The relay said goodbye, with its reason.
    #[error("the relay refused us: {0}")]
    Bye(String),
    /// The relay answered the hello with something else.
    #[error("the relay answered hello with {0}")]
    Unexpected(String),
}

/// The agent's or sender's side of a control channel, from the moment TLS
/// is up: hello, welcome, attach every hybrid connection, renew the tokens
/// at 80 % of their lifetime.
#[derive(Debug)]
pub struct PeerSession {
    channel: Channel<PeerMessage, RelayMessage>,
    attachments: Vec<ConnectionString>,
    token_ttl: Duration,
    /// `None` until the welcome: the handshake deadline.
    welcome_by: Option<Instant>,
    session: Option<u64>,
    next_renew: Option<Instant>,
}

impl PeerSession {
    /// Says hello; the welcome must come by `now + HANDSHAKE_TIMEOUT`.
    pub fn new(
        timing: Timing,
        hello: PeerHello,
        attachments: Vec<ConnectionString>,
        token_ttl: Duration,
        now: Instant,
    ) -> Self {
        let mut channel = Channel::new(timing, now);
        // The first message on an empty queue is far below any backlog limit.
        let _ = channel.send(&PeerMessage::Hello {
            version: PROTOCOL_VERSION,
            role: hello.role,
            identity: hello.identity,
            label: hello.label,
        });
        PeerSession {
            channel,
            attachments,
            token_ttl,
            welcome_by: Some(now + HANDSHAKE_TIMEOUT),
            session: None,
            next_renew: None,
        }
    }

    /// Queues a message for the relay.
    pub fn send(&mut self, msg: &PeerMessage) -> Result<(), PeerError> {
        Ok(self.channel.send(msg)?)
    }

    /// The relay's id of this session, once welcomed.
    pub fn session(&self) -> Option<u64> {
        self.session
    }

    /// The channel underneath, for the driver.
    pub fn channel(&mut self) -> &mut Channel<PeerMessage, RelayMessage> {
        &mut self.channel
    }

    fn renew_every(&self) -> Duration {
        self.token_ttl.mul_f32(0.8).max(Duration::from_secs(1))
    }

    fn sign_all(&mut self, renew: bool, unix_now: u64) -> Result<(), ChannelError> {
        let expiry = unix_now + self.token_ttl.as_secs();
        for cs in &self.attachments {
            let (hc, token) = (cs.hc.clone(), cs.token(expiry));
            self.channel.send(&if renew {
                PeerMessage::Renew { hc, token }
            } else {
                PeerMessage::Attach { hc, token }
            })?;
        }
        Ok(())
    }

    /// The next event; `unix_now` (seconds since the epoch) dates the
    /// tokens of the attaches that follow the welcome.
    pub fn poll_event(
        &mut self,
        now: Instant,
        unix_now: u64,
    ) -> Result<Option<PeerEvent>, PeerError> {
        let Some(msg) = self.channel.poll_message()? else {
            return Ok(None);
        };
        if let RelayMessage::Bye { message } = msg {
            return Err(PeerError::Bye(message));
        }
        if self.session.is_some() {
            return Ok(Some(PeerEvent::Message(msg)));
        }
        let RelayMessage::Welcome { session } = msg else {
            return Err(PeerError::Unexpected(format!("{msg:?}")));
        };
        self.session = Some(session);
        self.welcome_by = None;
        self.sign_all(false, unix_now)?;
        self.next_renew = Some(now + self.renew_every());
        Ok(Some(PeerEvent::Up { session }))
    }

    /// When [`PeerSession::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Instant {
        let mut at = self.channel.poll_timeout();
        for deadline in [self.welcome_by, self.next_renew].into_iter().flatten() {
            at = at.min(deadline);
        }
        at
    }

    /// Keep-alives, token renewal and the handshake deadline.
    pub fn handle_timeout(&mut self, now: Instant, unix_now: u64) -> Result<(), PeerError> {
        if self.welcome_by.is_some_and(|by| now >= by) {
            return Err(PeerError::NoWelcome(HANDSHAKE_TIMEOUT));
        }
        self.channel.handle_timeout(now)?;
        if self.next_renew.is_some_and(|at| now >= at) {
            self.sign_all(true, unix_now)?;
            self.next_renew = Some(now + self.renew_every());
        }
        Ok(())
    }
}

impl Session for PeerSession {
    type Command = PeerMessage;
    type Event = PeerEvent;
    type Error = PeerError;
    fn channel_mut(&mut self) -> &mut dyn Transmit {
        &mut self.channel
    }
    fn command(&mut self, command: PeerMessage) -> Result<(), PeerError> {
        self.send(&command)
    }
    fn poll_event(&mut self, clock: Clock) -> Result<Option<PeerEvent>, PeerError> {
        PeerSession::poll_event(self, clock.now, clock.unix)
    }
    fn poll_timeout(&self) -> Instant {
        PeerSession::poll_timeout(self)
    }
    fn handle_timeout(&mut self, clock: Clock) -> Result<(), PeerError> {
        PeerSession::handle_timeout(self, clock.now, clock.unix)
    }
}

/// What a peer says about itself in its hello.
#[derive(Clone, Debug)]
pub struct PeerHello {
    /// Sender or agent.
    pub role: PeerRole,
    /// The fingerprint of its data identity.
    pub identity: Fingerprint,
    /// A name for the relay's logs.
    pub label: PeerLabel,
}

/// What the relay side of a control channel asks of the hub.
#[derive(Debug, PartialEq)]
pub enum RelayEvent {
    /// A valid hello: register the session and call
    /// [`RelaySession::welcome`].
    Hello {
        /// Sender or agent.
        role: PeerRole,
        /// The fingerprint of its data identity.
        identity: Fingerprint,
        /// Its name for logs.
        label: PeerLabel,
    },
    /// A message for the hub (never a hello or a keep-alive).
    Message(PeerMessage),
}

/// Why the relay closed a control channel. Those that the peer can act on
/// were told to it in a `Bye` first, queued before the error returns.
#[derive(Debug, thiserror::Error)]
pub enum RelaySessionError {
    /// The channel died.
    #[error(transparent)]
    Channel(ChannelError),
    /// A message that does not decode, or too long.
    #[error("{0}")]
    BadMessage(String),
    /// No hello within [`HANDSHAKE_TIMEOUT`].
    #[error("no hello in time")]
    NoHello,
    /// The first message was not a hello.
    #[error("first message was not a hello")]
    NotHello,
    /// A hello after the first.
    #[error("second hello")]
    SecondHello,
    /// The peer speaks another protocol version.
    #[error("protocol version {0}")]
    Version(u32),
    /// Too many tokens without one attaching.
    #[error("{0}")]
    TooManyTokens(String),
    /// Nothing attached in time.
    #[error("{0}")]
    NoAttach(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for the hello, until the deadline.
    Hello(Instant),
    /// Hello seen, waiting for the hub to give the session an id.
    Registering,
    /// Welcomed, no token verified yet: attach by the deadline.
    Unauthenticated(Instant),
    /// At least one token verified.
    Authenticated,
}

/// How much of a peer's text a `Bye` or log line repeats.
const QUOTED_CHARS: usize = 200;

/// The relay's side of a control channel, from the moment TLS is up.
#[derive(Debug)]
pub struct RelaySession {
    channel: Channel<RelayMessage, PeerMessage>,
    stage: Stage,
    tokens_tried: u32,
}

impl RelaySession {
    /// A channel whose hello must arrive by `hello_by`; until it attaches,
    /// messages are limited to [`PRE_AUTH_MAX_MESSAGE_LEN`].
    pub fn new(timing: Timing, now: Instant, hello_by: Instant) -> Self {
        let mut channel = Channel::new(timing, now);
        channel.set_max_message_len(PRE_AUTH_MAX_MESSAGE_LEN);
        RelaySession {
            channel,
            stage: Stage::Hello(hello_by),
            tokens_tried: 0,
        }
    }

    /// The channel underneath, for the driver.
    pub fn channel(&mut self) -> &mut Channel<RelayMessage, PeerMessage> {
        &mut self.channel
    }

    /// Queues a message from the hub.
    pub fn send(&mut self, msg: &RelayMessage) -> Result<(), RelaySessionError> {
        self.channel.send(msg).map_err(RelaySessionError::Channel)
    }

    /// The hub registered the session as `session`: welcome the peer, who
    /// must now attach within [`ATTACH_TIMEOUT`].
    pub fn welcome(&mut self, session: u64, now: Instant) -> Result<(), RelaySessionError> {
        self.stage = Stage::Unauthenticated(now + ATTACH_TIMEOUT);
        self.send(&RelayMessage::Welcome { session })
    }

    /// A token verified: the session may send full-size messages and has no
    /// attach deadline any more.
    pub fn authenticated(&mut self) {
        if matches!(self.stage, Stage::Unauthenticated(_)) {
            self.stage = Stage::Authenticated;
            self.channel.set_max_message_len(MAX_MESSAGE_LEN);
        }
    }

    /// Whether a token has verified on this channel.
    pub fn is_authenticated(&self) -> bool {
        self.stage == Stage::Authenticated
    }

    /// Queues a `Bye` with `message`: the peer learns why before the close.
    fn farewell(&mut self, message: &str) {
        let _ = self.channel.send(&RelayMessage::Bye {
            message: message.to_string(),
        });
    }

    /// The next event for the hub.
    pub fn poll_event(&mut self) -> Result<Option<RelayEvent>, RelaySessionError> {
        let msg = match self.channel.poll_message() {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(None),
            Err(ChannelError::Decode(e)) => {
                let mut message = format!(
                    "bad message: {}",
                    crate::label::sanitized(&e.to_string(), QUOTED_CHARS)
                );
                if matches!(self.stage, Stage::Hello(_)) {
                    message = format!(
                        "bad hello: {}",
                        crate::label::sanitized(&e.to_string(), QUOTED_CHARS)
                    );
                } else if !self.is_authenticated() {
                    message.push_str(" (before a hybrid connection is attached)");
                }
                self.farewell(&message);
                return Err(RelaySessionError::BadMessage(message));
            }
            Err(e) => return Err(RelaySessionError::Channel(e)),
        };
        match (self.stage, msg) {
            (
                Stage::Hello(_),
                PeerMessage::Hello {
                    version,
                    role,
                    identity,
                    label,
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    self.farewell(&format!(
                        "this relay speaks protocol {PROTOCOL_VERSION}, you speak {version}; upgrade the older side"
                    ));
                    return Err(RelaySessionError::Version(version));
                }
                self.stage = Stage::Registering;
                Ok(Some(RelayEvent::Hello {
                    role,
                    identity,
                    label,
                }))
            }
            (Stage::Hello(_), _) => Err(RelaySessionError::NotHello),
            (_, PeerMessage::Hello { .. }) => Err(RelaySessionError::SecondHello),
            (stage, msg) => {
                let token = matches!(
                    msg,
                    PeerMessage::Attach { .. }
                        | PeerMessage::Renew { .. }
                        | PeerMessage::Describe { .. }
                );
                if token && stage != Stage::Authenticated {
                    self.tokens_tried += 1;
                    if self.tokens_tried > MAX_TOKENS_BEFORE_AUTH {
                        let message = format!(
                            "{MAX_TOKENS_BEFORE_AUTH} tokens presented on this channel and none attached; check the connection strings (`hybridlink hc keys NAME`)"
                        );
                        self.farewell(&message);
                        return Err(RelaySessionError::TooManyTokens(message));
                    }
                }
                Ok(Some(RelayEvent::Message(msg)))
            }
        }
    }

    /// When [`RelaySession::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Instant {
        let at = self.channel.poll_timeout();
        match self.stage {
            Stage::Hello(by) | Stage::Unauthenticated(by) => at.min(by),
            _ => at,
        }
    }

    /// Keep-alives and the hello and attach deadlines.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), RelaySessionError> {
        match self.stage {
            Stage::Hello(by) if now >= by => return Err(RelaySessionError::NoHello),
            Stage::Unauthenticated(by) if now >= by => {
                let message = format!(
                    "no hybrid connection attached within {ATTACH_TIMEOUT:?} of hello; attach with a token made from a connection string (`hybridlink hc keys NAME`)"
                );
                self.farewell(&message);
                return Err(RelaySessionError::NoAttach(message));
            }
            _ => {}
        }
        self.channel
            .handle_timeout(now)
            .map_err(RelaySessionError::Channel)
    }
}

impl Session for RelaySession {
    type Command = RelayMessage;
    type Event = RelayEvent;
    type Error = RelaySessionError;
    fn channel_mut(&mut self) -> &mut dyn Transmit {
        &mut self.channel
    }
    fn command(&mut self, command: RelayMessage) -> Result<(), RelaySessionError> {
        self.send(&command)
    }
    fn poll_event(&mut self, _clock: Clock) -> Result<Option<RelayEvent>, RelaySessionError> {
        RelaySession::poll_event(self)
    }
    fn poll_timeout(&self) -> Instant {
        RelaySession::poll_timeout(self)
    }
    fn handle_timeout(&mut self, clock: Clock) -> Result<(), RelaySessionError> {
        RelaySession::handle_timeout(self, clock.now)
    }
}

#[cfg(test)]
mod tests;
