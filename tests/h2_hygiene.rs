//! Transport hygiene: a client flooding one connection with streams it resets at once
//! (HTTP/2 rapid reset) has that connection ended, and neither it nor an oversized
//! header block crashes or wedges the server: other clients are served throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{build::ping, fixtures::SHANGHAI, start};
use tokio::net::TcpStream;
use tonic::Request;

fn grpc_request(addr: std::net::SocketAddr) -> http::Request<()> {
    http::Request::post(format!("http://{addr}/geomatch.v1.Nearby/SearchNearby"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_neither_crashes_nor_wedges_the_server() {
    let server = start(&[]).await;
    let mut honest = server.nearby().await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    let mut client = Some(client);
    for i in 0..20_000 {
        let Some(ready) = client.take() else { break };
        let Ok(mut ready) = ready.ready().await else {
            // The server ended this connection: the flood is over for it.
            break;
        };
        let Ok((response, mut stream)) = ready.send_request(grpc_request(server.addr), false)
        else {
            break;
        };
        client = Some(ready);
        stream.send_reset(h2::Reason::CANCEL);
        drop(response);
        sent += 1;
        if i % 2_000 == 0 {
            // Others are served during the flood.
            honest
                .update_location(ping(&format!("h2:honest{i}"), SHANGHAI))
                .await
                .unwrap();
        }
    }
    eprintln!("rapid reset: {sent} streams sent and reset before the server ended the connection");
    // The server ends such a connection (GOAWAY) long before the flood is through.
    assert!(sent < 20_000, "the flooding connection was never ended");
    drop(client);
    let _ = conn.await;
    // And after it.
    honest
        .update_location(ping("h2:after", SHANGHAI))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_header_block_is_refused_and_others_are_served() {
    let server = start(&[]).await;
    let mut c = server.nearby().await;
    let mut req = Request::new(ping("h2:big", SHANGHAI));
    req.metadata_mut()
        .insert("x-padding", "x".repeat(64 * 1024).parse().unwrap());
    assert!(
        c.update_location(req).await.is_err(),
        "a 64 KiB header block is refused"
    );
    let mut fresh = server.nearby().await;
    fresh
        .update_location(ping("h2:small", SHANGHAI))
        .await
        .unwrap();
    server.stop().await;
}

/// Writes `frames` copies of one HTTP/2 frame after the connection preface, never reading
/// the answers, for at most two seconds: how many went out before the server's TCP window
/// (it stops reading while its own answers are unread) held the flooder back.
async fn flood(addr: std::net::SocketAddr, frame: &[u8], frames: usize) -> usize {
    use tokio::io::AsyncWriteExt as _;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let batch: Vec<u8> = frame.repeat(1_000);
    let mut sent = 0;
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while sent < frames {
        match tokio::time::timeout_at(until, tcp.write_all(&batch)).await {
            Ok(Ok(())) => sent += 1_000,
            _ => break,
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_settings_floods_are_paced_and_others_are_served() {
    let server = start(&[]).await;
    let mut honest = server.nearby().await;
    // PING: 9-byte header (length 8, type 6, no flags, stream 0) and 8 bytes of payload.
    let ping_frame = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00gm-flood";
    // SETTINGS with no parameters: each one asks for an acknowledgement.
    let settings_frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let (pings, settings, served) = tokio::join!(
        flood(server.addr, ping_frame, 2_000_000),
        flood(server.addr, settings_frame, 2_000_000),
        async {
            let mut ok = 0;
            for i in 0..50 {
                if honest
                    .update_location(ping(&format!("h2:during{i}"), SHANGHAI))
                    .await
                    .is_ok()
                {
                    ok += 1;
                }
            }
            ok
        }
    );
    eprintln!("floods: {pings} PINGs and {settings} SETTINGS written in 2 s");
    assert_eq!(served, 50, "others are served during the floods");
    honest
        .update_location(ping("h2:after-flood", SHANGHAI))
        .await
        .unwrap();
    server.stop().await;
}
