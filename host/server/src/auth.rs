//! The bearer token that write requests need: given on the command line or in the
//! environment, or created at first start in a file only its owner can read.

use std::io::Write;
use std::path::PathBuf;

use actix_web::HttpRequest;

use crate::ApiError;
use crate::state::AppState;

/// `<user data dir>/tuneforge/token`.
pub fn token_file() -> PathBuf {
    dirs::data_dir().unwrap_or_else(std::env::temp_dir).join("tuneforge").join("token")
}

/// Reads the token file, or writes a new random token into it (mode 0600).
pub fn load_or_create_token(path: &std::path::Path) -> std::io::Result<String> {
    if let Ok(t) = std::fs::read_to_string(path)
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_owned());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let token = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(token.as_bytes())?;
    Ok(token)
}

/// Refuses a request without the right bearer token (compared in constant time).
pub fn require_token(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let given = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = state.token.as_bytes();
    let ok = given.len() == expected.len() && given.bytes().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if ok { Ok(()) } else { Err(ApiError::Unauthorized) }
}
