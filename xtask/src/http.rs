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
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.into() };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
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
