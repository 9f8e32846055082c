//! A small W3C WebDriver client over std's TCP (enough for the dashboard's end-to-end tests)
//! and a headless Chromium driven by Debian's `chromedriver`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// `chromedriver` on a free port, killed on drop.
pub struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    pub fn start() -> Self {
        let exe = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| panic!("chromedriver is missing: apt-get install chromium chromium-driver"));
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let child = Command::new(exe)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }

    /// A new headless Chromium session with a fresh profile.
    pub fn session(&self, profile: &std::path::Path) -> Session {
        self.session_with(profile, true)
    }

    /// A session with JavaScript on or off.
    pub fn session_with(&self, profile: &std::path::Path, javascript: bool) -> Session {
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1366,900",
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        if !javascript {
            args.push("--blink-settings=scriptEnabled=false".into());
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        }}});
        let v = request(self.port, "POST", "/session", Some(&caps));
        let id = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
        Session { port: self.port, id }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request(port: u16, method: &str, path: &str, body: Option<&Value>) -> Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to chromedriver");
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body.as_bytes())).expect("send");
    // Read the head, then exactly the body it announces (chromedriver may keep the connection).
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "chromedriver closed the connection");
        raw.extend_from_slice(&buf[..n]);
    };
    let headers = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let length =
        headers.lines().find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()));
    let payload = match length {
        Some(len) => {
            while raw.len() < head_end + len {
                let n = stream.read(&mut buf).expect("read");
                assert!(n > 0, "chromedriver closed the connection early");
                raw.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&raw[head_end..head_end + len]).into_owned()
        }
        // chromedriver always sends Content-Length; without one, read until it closes.
        None => {
            let _ = stream.read_to_end(&mut raw);
            String::from_utf8_lossy(&raw[head_end..]).into_owned()
        }
    };
    serde_json::from_str(&payload).unwrap_or_else(|e| panic!("chromedriver sent {payload}: {e}"))
}

/// A browser session.
pub struct Session {
    port: u16,
    id: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Session {
    /// Like `call`, but an error (a stale element while a page loads) is `None`.
    fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> Option<Value> {
        let v = request(self.port, method, &format!("/session/{}{path}", self.id), body.as_ref());
        v["value"]["error"].is_null().then(|| v["value"].clone())
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let v = request(self.port, method, &format!("/session/{}{path}", self.id), body.as_ref());
        if let Some(err) = v["value"]["error"].as_str() {
            panic!("webdriver {method} {path}: {err}: {}", v["value"]["message"]);
        }
        v["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn url(&self) -> String {
        self.call("GET", "/url", None).as_str().unwrap_or_default().to_string()
    }

    pub fn source(&self) -> String {
        self.call("GET", "/source", None).as_str().unwrap_or_default().to_string()
    }

    /// Every element matching a CSS selector.
    pub fn find_all(&self, css: &str) -> Vec<String> {
        let v = self.call("POST", "/elements", Some(json!({"using": "css selector", "value": css})));
        v.as_array()
            .map(|a| a.iter().filter_map(|e| e[ELEMENT].as_str().map(String::from)).collect())
            .unwrap_or_default()
    }

    /// The first element matching a CSS selector (panics when there is none).
    pub fn find(&self, css: &str) -> String {
        self.find_all(css).into_iter().next().unwrap_or_else(|| panic!("no element matches `{css}`"))
    }

    pub fn click(&self, element: &str) {
        self.call("POST", &format!("/element/{element}/click"), Some(json!({})));
    }

    pub fn text(&self, element: &str) -> String {
        self.call("GET", &format!("/element/{element}/text"), None).as_str().unwrap_or_default().to_string()
    }

    pub fn type_text(&self, element: &str, text: &str) {
        self.call("POST", &format!("/element/{element}/value"), Some(json!({ "text": text })));
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self, path: &std::path::Path) {
        use base64_decode as b64;
        let v = self.call("GET", "/screenshot", None);
        let png = b64(v.as_str().unwrap_or_default());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Waits until the address contains `part` (after a click that navigates).
    pub fn wait_for_url(&self, part: &str) {
        let started = Instant::now();
        while !self.url().contains(part) {
            assert!(started.elapsed() < Duration::from_secs(20), "never reached a URL with `{part}`: {}", self.url());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the first element matching `css` contains `text`.
    pub fn wait_for_text(&self, css: &str, text: &str) {
        let started = Instant::now();
        loop {
            let found = self
                .try_call("POST", "/element", Some(json!({"using": "css selector", "value": css})))
                .and_then(|e| e[ELEMENT].as_str().map(String::from))
                .and_then(|e| self.try_call("GET", &format!("/element/{e}/text"), None))
                .is_some_and(|t| t.as_str().is_some_and(|t| t.contains(text)));
            if found {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "`{css}` never showed `{text}` on {}", self.url());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `css` matches something (pages render on the server, so this is short).
    pub fn wait_for(&self, css: &str) -> String {
        let started = Instant::now();
        loop {
            let found = self
                .try_call("POST", "/element", Some(json!({"using": "css selector", "value": css})))
                .and_then(|e| e[ELEMENT].as_str().map(String::from));
            if let Some(e) = found {
                return e;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let source = self.source();
                let body = source.find("<body").map_or(source.as_str(), |i| &source[i..]);
                panic!("`{css}` never appeared on {}: {}", self.url(), &body[..body.len().min(1500)]);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = request(self.port, "DELETE", &format!("/session/{}", self.id), None);
    }
}

/// Standard base64 (what WebDriver sends screenshots in).
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in s.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes() {
        assert_eq!(super::base64_decode("aGVsbG8gd29ybGQ="), b"hello world");
    }
}
