//! The authenticated framing of inter-node RPCs.
//!
//! A connection starts with a mutual challenge-response: the server sends a fresh nonce, the
//! client answers with its node id and an ed25519 signature over both nonces and both ids, and
//! the server answers with its own signature. Every request and reply after that is signed over
//! the two nonces, a sequence number that must grow by one, and the SHA-256 of the body. So a
//! frame is accepted only from the member whose key signed it, only on the connection it was
//! made for, and only once: a replayed or reordered frame fails the sequence check, and one
//! copied to another connection fails the nonce check.

use std::io;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::NodeId;

/// Domain tag of every signature; the version changes with the frame layout.
const DOMAIN: &[u8] = b"fhir-ledger raft rpc v1\0";
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame accepted: bounds what an unauthenticated peer can make us buffer before the
/// handshake, and what a member can make us buffer after it.
pub const MAX_FRAME: usize = 512 * 1024 * 1024;
const MAX_HANDSHAKE_FRAME: usize = 4096;

pub type Nonce = [u8; 32];

#[derive(Serialize, Deserialize, Debug)]
pub struct Hello {
    pub version: u16,
    pub node_id: NodeId,
    pub nonce: Nonce,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Auth {
    pub from: NodeId,
    pub to: NodeId,
    pub nonce: Nonce,
    pub signature: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug)]
pub enum Welcome {
    Accepted { signature: Vec<u8> },
    Refused { reason: String },
}

/// A signed request or reply after the handshake.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Frame {
    pub seq: u64,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

fn fresh_nonce() -> Nonce {
    let mut n = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

fn handshake_message(role: &[u8], a: NodeId, b: NodeId, first: &Nonce, second: &Nonce) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + role.len() + 16 + 64);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(role);
    m.extend_from_slice(&a.to_be_bytes());
    m.extend_from_slice(&b.to_be_bytes());
    m.extend_from_slice(first);
    m.extend_from_slice(second);
    m
}

fn frame_message(role: &[u8], session: &[u8; 64], seq: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + role.len() + 64 + 8 + 32);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(role);
    m.extend_from_slice(session);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&Sha256::digest(body));
    m
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub async fn write_msg<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let bytes = bincode::serialize(msg).map_err(|e| invalid(e.to_string()))?;
    let len = u32::try_from(bytes.len()).map_err(|_| invalid("frame too large"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&bytes).await?;
    w.flush().await
}

pub async fn read_msg<R: AsyncRead + Unpin, T: for<'a> Deserialize<'a>>(r: &mut R, max: usize) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(invalid(format!("frame of {len} bytes exceeds the limit of {max}")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    bincode::deserialize(&buf).map_err(|e| invalid(e.to_string()))
}

fn verify(key: &VerifyingKey, msg: &[u8], sig: &[u8]) -> bool {
    Signature::from_slice(sig).is_ok_and(|s| key.verify(msg, &s).is_ok())
}

/// One authenticated connection's state: who is on the other end, the session's two nonces
/// and the next sequence numbers in each direction.
pub struct Session {
    pub peer: NodeId,
    session: [u8; 64],
    key: SigningKey,
    peer_key: VerifyingKey,
    /// Client side signs requests and checks replies; the server the other way round.
    is_client: bool,
    next_send: u64,
    next_recv: u64,
}

impl Session {
    fn roles(&self) -> (&'static [u8], &'static [u8]) {
        if self.is_client {
            (b"request", b"reply")
        } else {
            (b"reply", b"request")
        }
    }

    /// Signs `body` with the next sequence number.
    pub fn seal(&mut self, body: Vec<u8>) -> Frame {
        let seq = self.next_send;
        self.next_send += 1;
        Self::seal_at(&self.key, self.roles().0, &self.session, seq, body)
    }

    /// Signs `body` at an explicit sequence number (tests use it to replay and reorder).
    pub fn seal_with_seq(&self, seq: u64, body: Vec<u8>) -> Frame {
        Self::seal_at(&self.key, self.roles().0, &self.session, seq, body)
    }

    fn seal_at(key: &SigningKey, role: &[u8], session: &[u8; 64], seq: u64, body: Vec<u8>) -> Frame {
        let signature = key.sign(&frame_message(role, session, seq, &body)).to_bytes().to_vec();
        Frame { seq, body, signature }
    }

    /// Accepts a frame only if it is the next in sequence and signed by the peer for this
    /// session.
    pub fn open(&mut self, frame: Frame) -> io::Result<Vec<u8>> {
        if frame.seq != self.next_recv {
            return Err(invalid(format!(
                "frame {} out of sequence (expected {}): replayed or reordered",
                frame.seq, self.next_recv
            )));
        }
        if !verify(
            &self.peer_key,
            &frame_message(self.roles().1, &self.session, frame.seq, &frame.body),
            &frame.signature,
        ) {
            return Err(invalid(format!("frame {} is not signed by node {}", frame.seq, self.peer)));
        }
        self.next_recv += 1;
        Ok(frame.body)
    }
}

/// The client half of the handshake: proves we are `me` and checks that the server is `target`
/// holding `target_key`.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    me: NodeId,
    key: &SigningKey,
    target: NodeId,
    target_key: &VerifyingKey,
) -> io::Result<Session> {
    let hello: Hello = read_msg(stream, MAX_HANDSHAKE_FRAME).await?;
    if hello.version != PROTOCOL_VERSION {
        return Err(invalid(format!("peer speaks protocol {}, we speak {PROTOCOL_VERSION}", hello.version)));
    }
    if hello.node_id != target {
        return Err(invalid(format!("expected node {target} at this address, found node {}", hello.node_id)));
    }
    let nonce = fresh_nonce();
    let signature = key.sign(&handshake_message(b"client", me, target, &hello.nonce, &nonce)).to_bytes().to_vec();
    write_msg(stream, &Auth { from: me, to: target, nonce, signature }).await?;
    match read_msg(stream, MAX_HANDSHAKE_FRAME).await? {
        Welcome::Refused { reason } => Err(io::Error::new(io::ErrorKind::PermissionDenied, reason)),
        Welcome::Accepted { signature } => {
            if !verify(target_key, &handshake_message(b"server", target, me, &nonce, &hello.nonce), &signature) {
                return Err(invalid(format!("node {target} did not prove its key")));
            }
            Ok(Session {
                peer: target,
                session: session_id(&hello.nonce, &nonce),
                key: key.clone(),
                peer_key: *target_key,
                is_client: true,
                next_send: 0,
                next_recv: 0,
            })
        }
    }
}

fn session_id(server: &Nonce, client: &Nonce) -> [u8; 64] {
    let mut s = [0u8; 64];
    s[..32].copy_from_slice(server);
    s[32..].copy_from_slice(client);
    s
}

/// The server half: `trusted(from)` returns the key the committed membership (or the bootstrap
/// trust list) holds for a node, or None to refuse it.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    me: NodeId,
    key: &SigningKey,
    trusted: impl Fn(NodeId) -> Option<VerifyingKey>,
) -> io::Result<Session> {
    let nonce = fresh_nonce();
    write_msg(stream, &Hello { version: PROTOCOL_VERSION, node_id: me, nonce }).await?;
    let auth: Auth = read_msg(stream, MAX_HANDSHAKE_FRAME).await?;
    let checked = if auth.to != me {
        Err(format!("this is node {me}, not node {}", auth.to))
    } else {
        match trusted(auth.from) {
            None => Err(format!("node {} is not a member with a known key", auth.from)),
            Some(key) => {
                let msg = handshake_message(b"client", auth.from, me, &nonce, &auth.nonce);
                if verify(&key, &msg, &auth.signature) {
                    Ok(key)
                } else {
                    Err(format!("signature does not verify against node {}'s key", auth.from))
                }
            }
        }
    };
    let peer_key = match checked {
        Ok(k) => k,
        Err(reason) => {
            let _ = write_msg(stream, &Welcome::Refused { reason: reason.clone() }).await;
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, reason));
        }
    };
    let signature = key.sign(&handshake_message(b"server", me, auth.from, &auth.nonce, &nonce)).to_bytes().to_vec();
    write_msg(stream, &Welcome::Accepted { signature }).await?;
    Ok(Session {
        peer: auth.from,
        session: session_id(&nonce, &auth.nonce),
        key: key.clone(),
        peer_key,
        is_client: false,
        next_send: 0,
        next_recv: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (SigningKey, SigningKey) {
        (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]))
    }

    async fn pair() -> (Session, Session) {
        let (a, b) = keys();
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        let bk = b.verifying_key();
        let ak = a.verifying_key();
        let server = tokio::spawn(async move { server_handshake(&mut s, 2, &b, |id| (id == 1).then_some(ak)).await });
        let client = client_handshake(&mut c, 1, &a, 2, &bk).await.unwrap();
        (client, server.await.unwrap().unwrap())
    }

    #[tokio::test]
    async fn frames_are_accepted_once_in_order() {
        let (mut client, mut server) = pair().await;
        let f0 = client.seal(b"zero".to_vec());
        let f1 = client.seal(b"one".to_vec());
        assert!(server.open(f1.clone()).is_err(), "reordered frame");
        assert_eq!(server.open(f0.clone()).unwrap(), b"zero");
        assert!(server.open(f0).is_err(), "replayed frame");
        let mut forged = f1.clone();
        forged.body = b"two".to_vec();
        assert!(server.open(forged).is_err(), "altered body");
        assert_eq!(server.open(f1).unwrap(), b"one");
        let reply = server.seal(b"ok".to_vec());
        assert_eq!(client.open(reply).unwrap(), b"ok");
    }

    #[tokio::test]
    async fn a_frame_from_another_session_is_refused() {
        let (mut c1, _s1) = pair().await;
        let (_c2, mut s2) = pair().await;
        assert!(s2.open(c1.seal(b"x".to_vec())).is_err());
    }

    #[tokio::test]
    async fn unknown_or_forged_clients_are_refused() {
        let (a, b) = keys();
        let impostor = SigningKey::from_bytes(&[3; 32]);
        let ak = a.verifying_key();
        let bk = b.verifying_key();
        for (id, key) in [(1, impostor.clone()), (9, impostor)] {
            let (mut c, mut s) = tokio::io::duplex(1 << 16);
            let b = b.clone();
            let server =
                tokio::spawn(async move { server_handshake(&mut s, 2, &b, |id| (id == 1).then_some(ak)).await });
            let client = client_handshake(&mut c, id, &key, 2, &bk).await;
            assert_eq!(client.err().map(|e| e.kind()), Some(io::ErrorKind::PermissionDenied));
            assert!(server.await.unwrap().is_err());
        }
    }

    #[tokio::test]
    async fn a_server_without_the_members_key_is_refused() {
        let (a, _) = keys();
        let impostor = SigningKey::from_bytes(&[3; 32]);
        let real = SigningKey::from_bytes(&[2; 32]).verifying_key();
        let ak = a.verifying_key();
        let (mut c, mut s) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move { server_handshake(&mut s, 2, &impostor, |_| Some(ak)).await });
        assert!(client_handshake(&mut c, 1, &a, 2, &real).await.is_err());
    }
}
