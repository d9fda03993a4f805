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
