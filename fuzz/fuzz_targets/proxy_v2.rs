//! The PROXY protocol v2 header parser over arbitrary bytes, as a load balancer (or anyone who
//! reaches a port with `server.proxy_protocol`) could send them. Checks, besides "never
//! panics": the announced length is bounded before anything is read for it, a header that
//! parses gives back the addresses `encode` wrote, and `parse` refuses a rest of the wrong
//! length.
#![no_main]

use confab_protocol::proxy::{self, FIXED_LEN, MAX_REST_LEN, ProxyHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<FIXED_LEN>() else {
        return;
    };
    match proxy::rest_len(head) {
        Ok(len) => {
            assert!(len <= MAX_REST_LEN);
            if rest.len() >= len {
                if let Ok(ProxyHeader::Proxied {
                    source,
                    destination,
                }) = proxy::parse(head, &rest[..len])
                {
                    // What parses is what a balancer would have written (TLVs aside).
                    let again = proxy::encode(source, destination);
                    let (f, r) = again.split_at(FIXED_LEN);
                    let f: [u8; FIXED_LEN] = f.try_into().expect("16 bytes");
                    assert_eq!(
                        proxy::parse(&f, r),
                        Ok(ProxyHeader::Proxied {
                            source,
                            destination
                        })
                    );
                }
            }
            if rest.len() != len {
                assert!(proxy::parse(head, rest).is_err());
            }
        }
        Err(_) => assert!(proxy::parse(head, rest).is_err()),
    }
});
