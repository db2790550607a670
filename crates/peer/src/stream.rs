//! The raft stream: batches of raft messages from one member to another on a connection of
//! their own to the peer port, without HTTP/2.
//!
//! Why: a ReadIndex round crosses between members twice, and over a gRPC stream each crossing
//! passed through four tasks (the sender, hyper's body pipe, the HTTP/2 connection on each
//! side, the receiving handler). Here the sending task writes a batch to the socket itself and
//! the receiving task hands what it reads straight to raft.
//!
//! The wire, after TCP (and TLS for `https://` peers):
//! - the dialing member writes [`MAGIC`], then frames: a big-endian `u32` length and a
//!   protobuf `RaftBatch` (the same message as the gRPC `Raft` call's);
//! - the accepting member writes [`MAGIC`] back, and at most one more frame before it closes:
//!   why it refuses the stream (a `u8` gRPC code, then the message in UTF-8), the same checks
//!   and words as the gRPC call.
//!
//! The peer port keeps serving gRPC (snapshots, membership, forwarded requests, and the `Raft`
//! call itself): [`accept`] tells the two apart by the first bytes. A member that does not
//! answer [`MAGIC`] (one of an earlier version, which speaks only gRPC) is sent batches over
//! the gRPC call instead (see `PeerNetwork`), so a cluster can be upgraded member by member.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use metastore_proto::metastorepb::RaftBatch;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tonic::{Code, Status};

/// The first bytes of a raft stream, in both directions. An HTTP/2 connection starts with
/// `PRI * HTTP/2.0`, an HTTP/1 request with a method: neither starts like this.
pub const MAGIC: &[u8; 8] = b"MSRAFT/1";

/// How long an accepted connection may take to show its first bytes.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes the receiving side reads from the socket at once (a batch is usually far smaller).
const READ_BUFFER: usize = 64 * 1024;

/// A connection to a peer port, told apart by [`accept`].
pub enum Accepted<IO> {
    /// A raft stream; [`MAGIC`] is consumed.
    Raft(IO),
    /// Anything else (gRPC): the connection with the bytes read so far put back in front.
    Other(Rewind<IO>),
}

/// Reads as much of an accepted connection as tells a raft stream from anything else. Reads
/// stop at the first byte that differs from [`MAGIC`], so a connection that is not a raft
/// stream loses nothing: [`Rewind`] gives those bytes back.
pub async fn accept<IO: AsyncRead + Unpin>(mut io: IO) -> io::Result<Accepted<IO>> {
    let mut seen = [0u8; MAGIC.len()];
    let mut len = 0;
    let read = async {
        while len < MAGIC.len() {
            let n = io.read(&mut seen[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
            if seen[..len] != MAGIC[..len] {
                break;
            }
        }
        io::Result::Ok(())
    };
    tokio::time::timeout(FIRST_BYTES_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no bytes from the peer"))??;
    if len == MAGIC.len() && seen == *MAGIC {
        Ok(Accepted::Raft(io))
    } else {
        Ok(Accepted::Other(Rewind {
            prefix: seen[..len].to_vec(),
            pos: 0,
            inner: io,
        }))
    }
}

/// A connection whose first bytes were already read: they are read again first.
pub struct Rewind<IO> {
    prefix: Vec<u8>,
    pos: usize,
    inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.pos);
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Rewind<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Appends `batch` as one frame to `out`.
pub fn encode_frame(batch: &RaftBatch, out: &mut Vec<u8>) {
    let len = batch.encoded_len();
    out.reserve(4 + len);
    // A batch is bounded far below 4 GiB (MAX_BATCH_BYTES plus one message, itself bounded by
    // raft's max_size_per_msg); saturate rather than wrap if that ever changed.
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    batch.encode(out).expect("a Vec grows to take any message");
}

/// Serves one accepted raft stream (after [`MAGIC`]): answers [`MAGIC`], then hands each
/// batch to `receive` until the peer closes the connection, `stop` resolves, or `receive`
/// or the wire fails; a failure is written back before the connection is closed. Frames over
/// `max_frame` bytes are refused.
pub async fn serve<IO, F>(
    io: IO,
    max_frame: usize,
    mut receive: F,
    stop: impl std::future::Future<Output = ()>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(RaftBatch) -> Result<(), Status>,
{
    let (read, mut write) = tokio::io::split(io);
    if write.write_all(MAGIC).await.is_err() || write.flush().await.is_err() {
        return;
    }
    let mut read = BufReader::with_capacity(READ_BUFFER, read);
    let mut frame = Vec::new();
    let receiving = async {
        loop {
            let len = match read.read_u32().await {
                Ok(len) => len as usize,
                // The peer closed the stream (or its connection broke): nothing to answer.
                Err(_) => return None,
            };
            if len > max_frame {
                return Some(Status::resource_exhausted(format!(
                    "raft batch of {len} bytes is over the limit of {max_frame}"
                )));
            }
            frame.clear();
            frame.resize(len, 0);
            if read.read_exact(&mut frame).await.is_err() {
                return None;
            }
            let batch = match RaftBatch::decode(frame.as_slice()) {
                Ok(batch) => batch,
                Err(e) => {
                    return Some(Status::invalid_argument(format!(
                        "undecodable raft batch: {e}"
                    )))
                }
            };
            if let Err(status) = receive(batch) {
                return Some(status);
            }
        }
    };
    let refusal = tokio::select! {
        refusal = receiving => refusal,
        () = stop => None,
    };
    if let Some(status) = refusal {
        let mut out = Vec::with_capacity(5 + status.message().len());
        let message = status.message().as_bytes();
        out.extend_from_slice(
            &u32::try_from(1 + message.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.push(u8::try_from(status.code() as i32).unwrap_or(u8::MAX));
        out.extend_from_slice(message);
        let _ = write.write_all(&out).await;
    }
    let _ = write.shutdown().await;
}

/// How a raft stream ended, as the dialing member reads it.
#[derive(Debug, PartialEq)]
pub enum End {
    /// The peer did not answer [`MAGIC`]: it speaks only gRPC.
    Unsupported,
    /// The peer refused the stream, or it broke; what to log.
    Failed(String),
}

/// The dialing side's reading half: waits for the peer's [`MAGIC`] (within `answer_within`),
/// then for the end of the stream.
pub async fn read_answer<R: AsyncRead + Unpin>(mut read: R, answer_within: Duration) -> End {
    let mut magic = [0u8; MAGIC.len()];
    let mut len = 0;
    let answered = async {
        while len < MAGIC.len() {
            match read.read(&mut magic[len..]).await {
                Ok(0) => return Err(End::Failed("the peer closed the stream".to_string())),
                Ok(n) => len += n,
                Err(e) => return Err(End::Failed(e.to_string())),
            }
            if magic[..len] != MAGIC[..len] {
                return Err(End::Unsupported);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(answer_within, answered).await {
        Ok(Ok(())) => {}
        Ok(Err(end)) => return end,
        Err(_) => return End::Failed("the peer did not answer the raft stream".to_string()),
    }
    let len = match read.read_u32().await {
        Ok(len) => len as usize,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return End::Failed("the peer closed the stream".to_string())
        }
        Err(e) => return End::Failed(e.to_string()),
    };
    // A refusal is a code and a sentence; anything longer is not one.
    if len == 0 || len > 64 * 1024 {
        return End::Failed(format!("the peer sent a malformed refusal ({len} bytes)"));
    }
    let mut refusal = vec![0u8; len];
    if let Err(e) = read.read_exact(&mut refusal).await {
        return End::Failed(e.to_string());
    }
    let code = Code::from_i32(i32::from(refusal[0]));
    let message = String::from_utf8_lossy(&refusal[1..]);
    End::Failed(format!("{code}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(from: u64, messages: &[&[u8]]) -> RaftBatch {
        RaftBatch {
            cluster_id: 7,
            from,
            to: 2,
            messages: messages.iter().map(|m| m.to_vec()).collect(),
        }
    }

    #[tokio::test]
    async fn other_protocols_lose_no_byte() {
        for first in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"MS",
            b"MSRAFT/2 and more",
            b"",
        ] {
            let (mut client, server) = tokio::io::duplex(1024);
            client.write_all(first).await.unwrap();
            client.shutdown().await.unwrap();
            let Accepted::Other(mut io) = accept(server).await.unwrap() else {
                panic!("{first:?} taken for a raft stream");
            };
            let mut all = Vec::new();
            io.read_to_end(&mut all).await.unwrap();
            assert_eq!(all, first);
        }
    }

    #[tokio::test]
    async fn a_raft_stream_is_recognised_in_any_pieces() {
        let (mut client, server) = tokio::io::duplex(1024);
        let accepted = tokio::spawn(accept(server));
        for piece in [&b"MSR"[..], b"AFT", b"/1", b"rest"] {
            client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        let Accepted::Raft(mut io) = accepted.await.unwrap().unwrap() else {
            panic!("a raft stream taken for something else");
        };
        let mut rest = [0u8; 4];
        io.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"rest");
    }

    #[tokio::test]
    async fn batches_arrive_in_order_and_a_refusal_reaches_the_sender() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (tx, mut received) = tokio::sync::mpsc::unbounded_channel();
        let served = tokio::spawn(async move {
            let Accepted::Raft(io) = accept(server).await.unwrap() else {
                panic!("not recognised");
            };
            serve(
                io,
                1024,
                move |b: RaftBatch| {
                    if b.from == 9 {
                        return Err(Status::failed_precondition("member 9 was removed"));
                    }
                    tx.send(b).unwrap();
                    Ok(())
                },
                std::future::pending(),
            )
            .await;
        });
        let (read, mut write) = tokio::io::split(client);
        let answer = tokio::spawn(read_answer(read, Duration::from_secs(5)));
        let mut out = MAGIC.to_vec();
        encode_frame(&batch(1, &[b"a", b"bc"]), &mut out);
        encode_frame(&batch(1, &[]), &mut out);
        encode_frame(&batch(1, &[b"d"]), &mut out);
        write.write_all(&out).await.unwrap();
        for want in [batch(1, &[b"a", b"bc"]), batch(1, &[]), batch(1, &[b"d"])] {
            assert_eq!(received.recv().await.unwrap(), want);
        }
        let mut out = Vec::new();
        encode_frame(&batch(9, &[b"e"]), &mut out);
        write.write_all(&out).await.unwrap();
        assert_eq!(
            answer.await.unwrap(),
            End::Failed(format!(
                "{}: member 9 was removed",
                Code::FailedPrecondition
            ))
        );
        served.await.unwrap();
        assert!(received.recv().await.is_none(), "nothing after the refusal");
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_it_is_read() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(async move {
            let Accepted::Raft(io) = accept(server).await.unwrap() else {
                panic!("not recognised");
            };
            serve(io, 16, |_| Ok(()), std::future::pending()).await;
        });
        let (read, mut write) = tokio::io::split(client);
        let mut out = MAGIC.to_vec();
        encode_frame(&batch(1, &[&[0u8; 64]]), &mut out);
        write.write_all(&out).await.unwrap();
        match read_answer(read, Duration::from_secs(5)).await {
            End::Failed(text) => assert!(text.contains("over the limit of 16"), "{text}"),
            end => panic!("{end:?}"),
        }
        served.await.unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_answers_something_else_speaks_only_grpc() {
        let (client, mut server) = tokio::io::duplex(1024);
        // What an HTTP/2 server writes first: its SETTINGS frame.
        server
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        assert_eq!(
            read_answer(client, Duration::from_secs(5)).await,
            End::Unsupported
        );
        let (client, server) = tokio::io::duplex(1024);
        drop(server);
        assert_eq!(
            read_answer(client, Duration::from_secs(5)).await,
            End::Failed("the peer closed the stream".to_string()),
            "a closed connection is a failure, not an older peer"
        );
    }
}
