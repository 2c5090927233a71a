//! Which x402 payments policy allows, and what they cost in the budget's unit.
//!
//! Budgets are integers in **USDC's smallest unit** (6 decimals: 1000000 = $1). A
//! payment counts toward a budget only in an asset pag0 can convert to that unit: the
//! built-in USDC contracts below, or an asset the policy lists with its decimals (a
//! USD-pegged token: its amount is scaled to 6 decimals, rounded up). A payment in any
//! other asset is refused (`PAYMENT_NOT_ALLOWED`), never counted as if it were USDC.
//!
//! x402 v1 names chains (`base-sepolia`), v2 uses CAIP-2 ids (`eip155:84532`); both
//! are read as the same chain everywhere here.

use crate::core::amount::Amount;
use crate::core::x402::{self, PaymentRequired, Requirement};

/// v1 network names and their CAIP-2 ids.
const NETWORK_ALIASES: &[(&str, &str)] = &[
    ("base", "eip155:8453"),
    ("base-sepolia", "eip155:84532"),
    ("ethereum", "eip155:1"),
    ("mainnet", "eip155:1"),
    ("sepolia", "eip155:11155111"),
    ("polygon", "eip155:137"),
    ("polygon-amoy", "eip155:80002"),
    ("avalanche", "eip155:43114"),
    ("avalanche-fuji", "eip155:43113"),
    ("arbitrum", "eip155:42161"),
    ("arbitrum-sepolia", "eip155:421614"),
    ("optimism", "eip155:10"),
    ("optimism-sepolia", "eip155:11155420"),
    ("iotex", "eip155:4689"),
    ("sei", "eip155:1329"),
    ("sei-testnet", "eip155:1328"),
    ("peaq", "eip155:3338"),
];

/// Circle's USDC (6 decimals) by chain: counted 1:1 in the budget's unit.
const USDC: &[(&str, &str)] = &[
    ("eip155:1", "0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48"),
    (
        "eip155:11155111",
        "0x1c7d4b196cb0c7b01d743fbc6116a902379c7238",
    ),
    ("eip155:8453", "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"),
    ("eip155:84532", "0x036cbd53842c5426634e7929541ec2318f3dcf7e"),
    ("eip155:137", "0x3c499c542cef5e3811e1192ce70d8cc03d5c3359"),
    ("eip155:80002", "0x41e94eb019c0762f9bfcf9fb1e58725bfb0e7582"),
    ("eip155:43114", "0xb97ef9ef8734c71904d8002f8b6bc66dd9c48a6e"),
    ("eip155:43113", "0x5425890298aed601595a70ab815c96711a31bc65"),
    ("eip155:42161", "0xaf88d065e77c8cc2239327c5edb3a432268e5831"),
    (
        "eip155:421614",
        "0x75faf114eafb1bdbe2f0316df893fd58ce46aa4d",
    ),
    ("eip155:10", "0x0b2c639c533813f4aa9d7837caf62653d097ff85"),
    (
        "eip155:11155420",
        "0x5fd84259d66cd46123540766be93dfe6d43130d7",
    ),
];

/// Decimals of the budget's unit (USDC).
pub const BUDGET_DECIMALS: u8 = 6;

/// The CAIP-2 id of a network, whichever way it is written.
pub fn canonical_network(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    NETWORK_ALIASES
        .iter()
        .find(|(alias, _)| *alias == lower)
        .map_or(lower, |(_, id)| (*id).to_string())
}

/// An asset the policy counts toward budgets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetRule {
    /// Lowercase `0x…` address.
    pub address: String,
    /// CAIP-2 id; `None`: any network.
    pub network: Option<String>,
    pub decimals: u8,
}

/// What policy lets pag0 pay or relay: networks, assets and payees (empty = any
/// network, any payee; no asset list = the built-in USDC contracts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PaymentRules {
    /// CAIP-2 ids.
    pub networks: Vec<String>,
    pub assets: Vec<AssetRule>,
    pub payees: Vec<String>,
}

impl PaymentRules {
    /// The decimals of an asset on a network, if the policy counts it.
    fn decimals(&self, network: &str, asset: &str) -> Option<u8> {
        let asset = asset.to_ascii_lowercase();
        if self.assets.is_empty() {
            return USDC
                .iter()
                .any(|(n, a)| *n == network && *a == asset)
                .then_some(BUDGET_DECIMALS);
        }
        self.assets
            .iter()
            .find(|r| r.address == asset && r.network.as_deref().is_none_or(|n| n == network))
            .map(|r| r.decimals)
    }

    /// Whether an address is a built-in USDC contract on some network.
    pub fn to_budget_any_network(&self, asset: &str) -> Option<u8> {
        let asset = asset.to_ascii_lowercase();
        USDC.iter()
            .any(|(_, a)| *a == asset)
            .then_some(BUDGET_DECIMALS)
    }

    /// What a payment of `amount` in `asset` on `network` costs in the budget's unit,
    /// or why it cannot count.
    pub fn to_budget(&self, network: &str, asset: &str, amount: Amount) -> Result<Amount, String> {
        let network = canonical_network(network);
        let decimals = self.decimals(&network, asset).ok_or_else(|| {
            if self.assets.is_empty() {
                format!("asset {asset} on {network} is not a known USDC contract, and the policy lists no other asset (x402.assets)")
            } else {
                format!("asset {asset} on {network} is not in the policy's x402.assets")
            }
        })?;
        scale(amount, decimals)
            .ok_or_else(|| format!("amount {amount} does not fit the budget arithmetic"))
    }

    /// Checks a payment's scheme, network, asset and payee; the error names the field.
    pub fn check_payment(
        &self,
        scheme: &str,
        network: &str,
        asset: Option<&str>,
        payee: &str,
    ) -> Result<(), String> {
        if scheme != "exact" {
            return Err(format!(
                "scheme {scheme:?} is not supported (only \"exact\")"
            ));
        }
        let network = canonical_network(network);
        if !self.networks.is_empty() && !self.networks.contains(&network) {
            return Err(format!("network {network} is not in x402.networks"));
        }
        if !self.payees.is_empty() && !self.payees.iter().any(|p| p.eq_ignore_ascii_case(payee)) {
            return Err(format!("payee {payee} is not in x402.payees"));
        }
        match asset {
            None => {
                Err("the payment does not name its asset and no offer for it was seen".to_string())
            }
            Some(asset) => self.to_budget(&network, asset, 0).map(|_| ()),
        }
    }

    /// Whether a requirement of a 402 may be paid.
    pub fn check(&self, r: &Requirement) -> Result<Amount, String> {
        self.check_payment(&r.scheme, &r.network, Some(&r.asset), &r.pay_to)?;
        self.to_budget(&r.network, &r.asset, r.amount)
    }
}

/// `amount` in an asset of `decimals` decimals, in the budget's unit (rounded up).
fn scale(amount: Amount, decimals: u8) -> Option<Amount> {
    match decimals.cmp(&BUDGET_DECIMALS) {
        std::cmp::Ordering::Equal => Some(amount),
        std::cmp::Ordering::Greater => {
            let div = 10u64.checked_pow(u32::from(decimals - BUDGET_DECIMALS))?;
            Some(amount.div_ceil(div))
        }
        std::cmp::Ordering::Less => {
            let mul = 10u64.checked_pow(u32::from(BUDGET_DECIMALS - decimals))?;
            amount.checked_mul(mul)
        }
    }
}

/// The requirement of an offer to pay: the cheapest (in the budget's unit) that policy
/// allows, with its budget price; else why none can be paid.
pub fn choose<'a>(
    offer: &'a PaymentRequired,
    rules: &PaymentRules,
) -> Result<(&'a Requirement, Amount), String> {
    let mut why = String::from("the offer has no requirement");
    let mut best: Option<(&Requirement, Amount)> = None;
    for r in &offer.accepts {
        match rules.check(r) {
            Ok(price) => {
                if best.is_none_or(|(_, p)| price < p) {
                    best = Some((r, price));
                }
            }
            Err(reason) => why = reason,
        }
    }
    best.ok_or(why)
}

/// How a payment ended, read from the server's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentOutcome {
    /// The server settled it: charge, with the transaction.
    Settled(Option<String>),
    /// The server refused it (402 again, or a failed settlement): release.
    Failed(String),
    /// No settlement came back: the money may have moved, so it stays charged and is
    /// marked unconfirmed.
    Unconfirmed,
}

/// What the ledger does with a payment's outcome, and what the agent is told.
pub struct PaymentEffect {
    /// Keep the reservation as spent (else release it).
    pub commit: bool,
    /// Count it in the report's unconfirmed payments.
    pub unconfirmed: bool,
    /// The `x-pag0-payment` header.
    pub header: String,
}

impl PaymentOutcome {
    pub fn effect(&self, amount: Amount, network: &str) -> PaymentEffect {
        let (commit, unconfirmed, status, tx) = match self {
            PaymentOutcome::Settled(tx) => (true, false, "settled", tx.as_deref()),
            PaymentOutcome::Failed(_) => (false, false, "failed", None),
            PaymentOutcome::Unconfirmed => (true, true, "unconfirmed", None),
        };
        PaymentEffect {
            commit,
            unconfirmed,
            header: x402::payment_header(status, amount, network, tx),
        }
    }
}

/// The outcome of a payment from the answer's status and settlement header. A 402
/// again is a refusal, with the server's reason from its settlement header when it
/// gives one (v2 servers put it in `PAYMENT-RESPONSE`).
pub fn payment_outcome(status: Option<u32>, settlement: Option<&[u8]>) -> PaymentOutcome {
    let parsed = settlement.map(x402::parse_settlement_header);
    if status == Some(402) {
        let reason = match parsed {
            Some(Ok(s)) => s.error_reason,
            _ => None,
        };
        return PaymentOutcome::Failed(reason.map_or_else(
            || "the server answered 402 again".to_string(),
            |r| format!("the server answered 402 again: {r}"),
        ));
    }
    match parsed {
        Some(Ok(s)) if s.success => PaymentOutcome::Settled(s.transaction),
        Some(Ok(s)) => {
            PaymentOutcome::Failed(s.error_reason.unwrap_or_else(|| "settlement failed".into()))
        }
        Some(Err(_)) | None => PaymentOutcome::Unconfirmed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::base64;
    use serde_json::json;

    const SEPOLIA_USDC: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
    const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";

    fn entry(amount: &str, network: &str, asset: &str) -> serde_json::Value {
        json!({"scheme": "exact", "network": network, "amount": amount, "asset": asset, "payTo": PAY_TO,
               "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}})
    }

    fn offer(entries: Vec<serde_json::Value>) -> PaymentRequired {
        let v = json!({"x402Version": 2, "resource": {"url": "https://api.example/x"}, "accepts": entries});
        x402::parse_required_header(base64::encode(v.to_string().as_bytes()).as_bytes()).unwrap()
    }

    #[test]
    fn v1_and_v2_names_of_a_chain_are_one_chain() {
        assert_eq!(canonical_network("base-sepolia"), "eip155:84532");
        assert_eq!(canonical_network("eip155:84532"), "eip155:84532");
        let rules = PaymentRules {
            networks: vec![canonical_network("base-sepolia")],
            ..PaymentRules::default()
        };
        assert!(rules
            .check_payment("exact", "eip155:84532", Some(SEPOLIA_USDC), PAY_TO)
            .is_ok());
        assert!(rules
            .check_payment("exact", "base-sepolia", Some(SEPOLIA_USDC), PAY_TO)
            .is_ok());
        assert!(rules
            .check_payment("exact", "base", Some(SEPOLIA_USDC), PAY_TO)
            .is_err());
    }

    #[test]
    fn the_cheapest_allowed_requirement_is_chosen_in_budget_units() {
        let dai = "0x6b175474e89094c44da98b954eedeac495271d0f";
        let o = offer(vec![
            entry("20000", "eip155:84532", SEPOLIA_USDC),
            // 0.01 of an 18-decimal stablecoin: 10000 in budget units, cheaper…
            entry("10000000000000000", "eip155:1", dai),
            entry("15000", "eip155:84532", SEPOLIA_USDC),
        ]);
        // …but not counted unless the policy lists it with its decimals.
        let (r, price) = choose(&o, &PaymentRules::default()).unwrap();
        assert_eq!((r.amount, price), (15_000, 15_000));
        let with_dai = PaymentRules {
            assets: vec![
                AssetRule {
                    address: dai.into(),
                    network: Some("eip155:1".into()),
                    decimals: 18,
                },
                AssetRule {
                    address: SEPOLIA_USDC.to_ascii_lowercase(),
                    network: None,
                    decimals: 6,
                },
            ],
            ..PaymentRules::default()
        };
        assert_eq!(choose(&o, &with_dai).unwrap().1, 10_000);
        let nobody = PaymentRules {
            payees: vec!["0x0000000000000000000000000000000000000001".into()],
            ..PaymentRules::default()
        };
        assert!(choose(&o, &nobody).unwrap_err().contains("payee"));
    }

    #[test]
    fn an_asset_without_conversion_is_never_counted_as_usdc() {
        let rules = PaymentRules::default();
        let err = rules
            .to_budget(
                "eip155:8453",
                "0x0000000000000000000000000000000000000bad",
                5,
            )
            .unwrap_err();
        assert!(err.contains("not a known USDC contract"), "{err}");
        assert_eq!(scale(1, 18), Some(1)); // rounds up
        assert_eq!(scale(1_000_000_000_000, 18), Some(1));
        assert_eq!(scale(5, 2), Some(50_000));
        assert_eq!(scale(u64::MAX, 2), None);
    }

    #[test]
    fn a_v2_failure_keeps_the_servers_reason() {
        let header = base64::encode(br#"{"success":false,"errorReason":"insufficient_funds"}"#);
        match payment_outcome(Some(402), Some(header.as_bytes())) {
            PaymentOutcome::Failed(why) => assert!(why.ends_with("insufficient_funds"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            payment_outcome(Some(200), None),
            PaymentOutcome::Unconfirmed
        );
    }
}
