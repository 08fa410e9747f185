//! PKCE and the parsing of the URLs sluice calls itself.

use super::*;
use crate::policy::domain::Host;

#[test]
fn pkce_challenge_is_s256_of_the_verifier() {
    let (verifier, challenge) = pkce_pair();
    assert_eq!(verifier.len(), 43);
    assert_eq!(
        challenge,
        URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
    );
    // RFC 7636 appendix B.
    let v = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    assert_eq!(
        URL_SAFE_NO_PAD.encode(Sha256::digest(v.as_bytes())),
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    );
}

#[test]
fn https_urls() {
    let u = HttpsUrl::parse("https://auth.example.com/oauth/token").unwrap();
    assert_eq!((u.port, u.path.as_str()), (443, "/oauth/token"));
    assert_eq!(
        HttpsUrl::parse("https://auth.example.com:8443")
            .unwrap()
            .path,
        "/"
    );
    for bad in [
        "http://auth.example.com/t",
        "https://user@auth.example.com/",
        "https://10.0.0.1/t",
        "https://a.example.com/#x",
    ] {
        let parsed = HttpsUrl::parse(bad);
        assert!(
            parsed.is_err() || matches!(parsed.unwrap().host, Host::V4(_)),
            "{bad}"
        );
    }
}
