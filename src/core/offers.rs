//! x402 offers seen in relay mode: when a 402 passes through pag0 on its way to the
//! agent, its requirements are remembered for a while, so that the agent's payment
//! can be checked against the offer it answers. A v1 payment (`X-PAYMENT`) does not
//! name its asset; the offer does. A fixed table in shared data (`entries` slots, a
//! key may use 4), like the cache: bounded whatever the traffic.

use sha2::{Digest, Sha256};

use crate::core::amount::Amount;
use crate::core::ledger::codec::{put_len, put_str, put_u64, DecodeError, Reader};
use crate::core::payments::canonical_network;
use crate::core::store::{offer_slot_key, read, update, SharedStore, Step};
use crate::core::x402::PaymentRequired;

const VERSION: u8 = 1;
/// Slots of the table.
pub const ENTRIES: u32 = 1024;
const WAYS: u32 = 4;
/// How long an offer is remembered.
const KEEP_MS: u64 = 15 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Offered {
    network: String,
    pay_to: String,
    asset: String,
    amount: Amount,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct OfferEntry {
    key: String,
    stored_ms: u64,
    accepts: Vec<Offered>,
}

impl OfferEntry {
    fn encode(&self) -> Vec<u8> {
        let mut w = vec![VERSION];
        put_str(&mut w, &self.key);
        put_u64(&mut w, self.stored_ms);
        put_len(&mut w, self.accepts.len());
        for a in self.accepts.iter().take(255) {
            put_str(&mut w, &a.network);
            put_str(&mut w, &a.pay_to);
            put_str(&mut w, &a.asset);
            put_u64(&mut w, a.amount);
        }
        w
    }

    fn decode(bytes: &[u8]) -> Result<OfferEntry, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return Err(DecodeError);
        }
        let key = r.string()?;
        let stored_ms = r.u64()?;
        let mut accepts = Vec::new();
        for _ in 0..r.u8()? {
            accepts.push(Offered {
                network: r.string()?,
                pay_to: r.string()?,
                asset: r.string()?,
                amount: r.u64()?,
            });
        }
        r.end()?;
        Ok(OfferEntry {
            key,
            stored_ms,
            accepts,
        })
    }
}

fn offer_key(tenant: &str, session: &str, endpoint: &str) -> String {
    let mut k = String::with_capacity(tenant.len() + session.len() + endpoint.len() + 2);
    for (i, part) in [tenant, session, endpoint].iter().enumerate() {
        if i > 0 {
            k.push('\n');
        }
        k.push_str(part);
    }
    k
}

fn slots(key: &str) -> impl Iterator<Item = u32> {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let base = (u64::from_le_bytes(first) % u64::from(ENTRIES / WAYS)) as u32 * WAYS;
    (0..WAYS).map(move |i| base + i)
}

/// Remembers the offer a 402 made to a session's call of an endpoint.
pub fn remember<S: SharedStore + ?Sized>(
    store: &S,
    tenant: &str,
    session: &str,
    endpoint: &str,
    offer: &PaymentRequired,
    now_ms: u64,
) {
    let key = offer_key(tenant, session, endpoint);
    let entry = OfferEntry {
        key: key.clone(),
        stored_ms: now_ms,
        accepts: offer
            .accepts
            .iter()
            .map(|r| Offered {
                network: canonical_network(&r.network),
                pay_to: r.pay_to.clone(),
                asset: r.asset.clone(),
                amount: r.amount,
            })
            .collect(),
    };
    // Its own old entry, else an empty or expired slot, else the oldest.
    let mut best: Option<(u32, (u8, u64))> = None;
    for slot in slots(&key) {
        let current = read(store, &offer_slot_key(slot))
            .ok()
            .and_then(|b| OfferEntry::decode(&b).ok());
        let rank = match &current {
            Some(e) if e.key == key => (0, 0),
            None => (1, 0),
            Some(e) if now_ms.saturating_sub(e.stored_ms) > KEEP_MS => (2, e.stored_ms),
            Some(e) => (3, e.stored_ms),
        };
        if best.is_none_or(|(_, r)| rank < r) {
            best = Some((slot, rank));
        }
    }
    if let Some((slot, _)) = best {
        let bytes = entry.encode();
        let _ = update(store, &offer_slot_key(slot), |_| {
            Ok(Step::Write(bytes.clone(), ()))
        });
    }
}

/// Whose offer: a tenant's session calling an endpoint.
#[derive(Debug, Clone, Copy)]
pub struct OfferOf<'a> {
    pub tenant: &'a str,
    pub session: &'a str,
    pub endpoint: &'a str,
}

/// The asset of the offer a payment answers: same network and payee, and an amount
/// the payment covers. `None` when no such offer was seen.
pub fn asset_for<S: SharedStore + ?Sized>(
    store: &S,
    of: OfferOf,
    network: &str,
    pay_to: &str,
    value: Amount,
    now_ms: u64,
) -> Option<String> {
    let key = offer_key(of.tenant, of.session, of.endpoint);
    let network = canonical_network(network);
    for slot in slots(&key) {
        let Ok(bytes) = read(store, &offer_slot_key(slot)) else {
            continue;
        };
        let Ok(entry) = OfferEntry::decode(&bytes) else {
            continue;
        };
        if entry.key != key || now_ms.saturating_sub(entry.stored_ms) > KEEP_MS {
            continue;
        }
        return entry
            .accepts
            .iter()
            .filter(|a| {
                a.network == network && a.pay_to.eq_ignore_ascii_case(pay_to) && value >= a.amount
            })
            .min_by_key(|a| a.amount)
            .map(|a| a.asset.clone());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::base64;
    use crate::core::store::MemoryStore;
    use crate::core::x402;

    #[test]
    fn a_v1_payment_finds_the_asset_of_the_offer_it_answers() {
        let store = MemoryStore::new();
        let body = br#"{"x402Version":1,"accepts":[{"scheme":"exact","network":"base-sepolia","maxAmountRequired":"10000",
            "asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
            "resource":"http://x402.local/weather","maxTimeoutSeconds":60}]}"#;
        let offer = x402::parse_required_body(body).unwrap();
        remember(&store, "t", "s", "x402.local/weather", &offer, 1000);
        let payee = "0x209693bc6afc0c5328ba36faf03c514ef312287c";
        let of = |session| OfferOf {
            tenant: "t",
            session,
            endpoint: "x402.local/weather",
        };
        let found = asset_for(&store, of("s"), "eip155:84532", payee, 10_000, 2000);
        assert_eq!(
            found.as_deref(),
            Some("0x036cbd53842c5426634e7929541ec2318f3dcf7e")
        );
        // Another session, a smaller payment, a stale offer: nothing.
        assert!(asset_for(&store, of("s2"), "base-sepolia", payee, 10_000, 2000).is_none());
        assert!(asset_for(&store, of("s"), "base-sepolia", payee, 9_999, 2000).is_none());
        let stale = 1000 + KEEP_MS + 1;
        assert!(asset_for(&store, of("s"), "base-sepolia", payee, 10_000, stale).is_none());
        let _ = base64::encode(b"");
    }
}
