//! The portal: a web page over the management API, served on the API's
//! address at `/`, with its script and style under `/portal/`.
//!
//! The files in `src/portal/` are compiled into the binary, so the page
//! needs nothing from the internet and always matches the relay serving it.
//! They are public (they hold no data); the page asks for the manage key
//! and sends it with every API call, like any other client of the API. The
//! Content-Security-Policy lets the page load only these files and talk
//! only to this origin, so nothing injected into it could run or leak.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Sent with every portal file: scripts, styles, images and API calls come
/// from this origin only; no inline script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'; object-src 'none'";

/// Path, content type and content of each portal file.
const FILES: [(&str, &str, &str); 4] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("portal/index.html"),
    ),
    (
        "/portal/app.js",
        "text/javascript; charset=utf-8",
        include_str!("portal/app.js"),
    ),
    (
        "/portal/style.css",
        "text/css; charset=utf-8",
        include_str!("portal/style.css"),
    ),
    (
        "/portal/icon.svg",
        "image/svg+xml",
        include_str!("portal/icon.svg"),
    ),
];

/// The portal's routes, to be merged next to the API (they need no key).
pub fn router() -> Router {
    FILES
        .iter()
        .fold(Router::new(), |router, &(path, content_type, body)| {
            router.route(path, get(move || async move { file(content_type, body) }))
        })
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // Small files: always ask, so a relay upgrade shows its own page.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
