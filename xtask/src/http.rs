//! A minimal HTTP/1.1 client over std's TCP for talking to `tuneforge serve` on loopback
//! (benchmarks, the demo's simulated users).

use std::io::{Read, Write};
use std::net::TcpStream;

use anyhow::Context;

/// One request; returns the status and the body.
pub fn request(port: u16, method: &str, path: &str, body: &str, token: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no status line")?;
    // The API answers JSON with a Content-Length, never chunked.
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, rest)| rest.to_owned());
    Ok((status, body))
}

/// A JSON request that must succeed (2xx); returns the parsed body.
pub fn json(
    port: u16,
    method: &str,
    path: &str,
    body: &serde_json::Value,
    token: &str,
) -> anyhow::Result<serde_json::Value> {
    let (status, text) = request(port, method, path, &body.to_string(), token)?;
    if !(200..300).contains(&status) {
        anyhow::bail!("{method} {path} answered {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON: {text}"))
}
