//! `sluice explain`: run the proxy's own policy function for a URL and print every check, the
//! resolved addresses and the verdict. Nothing is sent upstream (DNS queries are made, exactly
//! as the proxy would make them).

use std::fmt::Write;

use http::{HeaderMap, HeaderValue};

use crate::config::Snapshot;
use crate::policy::{Check, Observer, evaluate};
use crate::request::{X_CONNECTOR, X_WORKSPACE};

/// Collects each passed check as a line.
#[derive(Default)]
struct Printer {
    out: String,
}

impl Observer for Printer {
    fn passed(&mut self, check: Check, detail: impl FnOnce() -> String) {
        let _ = writeln!(self.out, "  ok    {:<26} {}", check.as_str(), detail());
    }
}

/// The report, and whether the request would be allowed.
pub async fn explain(
    snap: &Snapshot,
    caller_name: Option<&str>,
    connector: &str,
    workspace: &str,
    url: &str,
) -> (String, bool) {
    let mut printer = Printer::default();
    let _ = writeln!(printer.out, "explain {url}");
    let caller = match caller_name {
        None => None,
        Some(name) => match snap.callers.by_name(name) {
            Some(c) => Some(c),
            None => {
                let _ = writeln!(
                    printer.out,
                    "  FAIL  caller                     no caller named {name:?}"
                );
                return (printer.out, false);
            }
        },
    };
    let mut headers = HeaderMap::new();
    for (name, value) in [(X_CONNECTOR, connector), (X_WORKSPACE, workspace)] {
        match HeaderValue::from_str(value) {
            Ok(v) => {
                headers.insert(name, v);
            }
            Err(_) => {
                let _ = writeln!(
                    printer.out,
                    "  FAIL  routing headers            {name} is not a valid header value"
                );
                return (printer.out, false);
            }
        }
    }
    let mut target = None;
    let verdict = evaluate(
        snap,
        caller.as_deref(),
        url.as_bytes(),
        &headers,
        &mut target,
        &mut printer,
    )
    .await;
    let allowed = verdict.is_ok();
    match verdict {
        Ok(v) => {
            let origin_form = target.as_ref().map_or("/", |t| t.origin_form.as_str());
            let _ = writeln!(
                printer.out,
                "verdict: ALLOW  connect {} (TLS, SNI {}), send Host {} {origin_form}",
                v.addr,
                v.sni(),
                v.host_header()
            );
        }
        Err(r) => {
            let _ = writeln!(
                printer.out,
                "  FAIL  {}\nverdict: REFUSE {} {} ({})",
                r.message,
                r.code.status().as_u16(),
                r.code,
                r.message
            );
        }
    }
    (printer.out, allowed)
}
