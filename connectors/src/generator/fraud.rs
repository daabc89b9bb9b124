//! Card transactions with fraud patterns.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::json;

use super::{round2, start_probability, EventGenerator, Generated};

/// (country, city, currency, utc offset hours)
const PLACES: &[(&str, &str, &str, i64)] = &[
    ("US", "Los Angeles", "USD", -8),
    ("US", "New York", "USD", -5),
    ("BR", "Sao Paulo", "BRL", -3),
    ("GB", "London", "GBP", 0),
    ("DE", "Berlin", "EUR", 1),
    ("FR", "Paris", "EUR", 1),
    ("TR", "Istanbul", "TRY", 3),
    ("PK", "Karachi", "PKR", 5),
    ("SG", "Singapore", "SGD", 8),
    ("JP", "Tokyo", "JPY", 9),
    ("AU", "Sydney", "AUD", 10),
];

/// (mcc, category, merchant names)
const NORMAL: &[(&str, &str, &[&str])] = &[
    ("5411", "grocery", &["FreshMart", "GreenGrocer", "DailyFoods"]),
    ("5812", "restaurant", &["Luigi's", "Noodle Bar", "Burger Spot"]),
    ("5541", "fuel", &["QuickFuel", "Shell Station"]),
    ("5311", "department_store", &["MegaStore", "CityMall"]),
    ("4121", "rideshare", &["RideNow", "CityCab"]),
    ("5732", "electronics", &["TechWorld", "GadgetHub"]),
    ("5912", "pharmacy", &["HealthPlus", "CarePharm"]),
    ("4111", "transit", &["Metro Transit"]),
];
const HIGH_RISK: &[(&str, &str, &[&str])] = &[
    ("7995", "gambling", &["LuckyBet Online", "Casino Royale Web"]),
    ("6051", "crypto_exchange", &["CoinSwap", "QuickCrypto"]),
    ("4829", "money_transfer", &["FastWire", "SendCash"]),
    ("5944", "jewelry", &["Golden Jewels"]),
];
const TESTING: &[(&str, &str, &[&str])] = &[
    ("5816", "digital_games", &["GameCoins", "PlayStore X"]),
    ("5818", "digital_goods", &["eBooks4U", "AppCredits", "SkinShop"]),
    ("4899", "streaming", &["StreamBox", "TuneFlix"]),
];

const PATTERNS: [&str; 4] = ["card_testing", "geo_impossible", "night_high_risk", "large_amount"];
/// Mean events per pattern: card_testing 4..=8 (6), the others 1.
const MEAN_PATTERN_LEN: f64 = (6.0 + 1.0 + 1.0 + 1.0) / 4.0;

struct Card {
    id: String,
    home: usize,
    avg_amount: f64,
    last_place: usize,
    last_ts: Option<i64>,
    recent: VecDeque<i64>,
}

/// Card-transaction generator (see [`super::GeneratorKind::Fraud`]).
pub struct FraudGenerator {
    rng: StdRng,
    cards: Vec<Card>,
    start_p: f64,
    clock_ms: i64,
    seq: u64,
    pending: VecDeque<Generated>,
}

impl FraudGenerator {
    pub fn new(mut rng: StdRng, entities: usize, rate: f64, start_ms: i64) -> Self {
        let cards = (0..entities)
            .map(|i| {
                let home = rng.gen_range(0..PLACES.len());
                // log-normal-ish usual spend around 10..150
                let avg = (rng.gen_range(2.3f64..5.0)).exp();
                Card {
                    id: format!("card-{i:06}"),
                    home,
                    avg_amount: round2(avg),
                    last_place: home,
                    last_ts: None,
                    recent: VecDeque::new(),
                }
            })
            .collect();
        FraudGenerator {
            rng,
            cards,
            start_p: start_probability(rate, MEAN_PATTERN_LEN),
            clock_ms: start_ms,
            seq: 0,
            pending: VecDeque::new(),
        }
    }

    fn tick(&mut self, max_ms: i64) {
        self.clock_ms += self.rng.gen_range(1..=max_ms);
    }

    fn local_hour(&self, place: usize) -> i64 {
        let h = self.clock_ms.div_euclid(3_600_000) + PLACES[place].3;
        h.rem_euclid(24)
    }

    #[allow(clippy::too_many_arguments)]
    fn txn(&mut self, card: usize, place: usize, amount: f64, cat: (&str, &str, &[&str]), channel: &str, pattern: &'static str) -> Generated {
        let now = self.clock_ms;
        let merchant = cat.2[self.rng.gen_range(0..cat.2.len())];
        let merchant = format!("{merchant} #{}", self.rng.gen_range(100..999));
        let local_hour = self.local_hour(place);
        let c = &mut self.cards[card];
        while c.recent.front().is_some_and(|t| now - *t > 600_000) {
            c.recent.pop_front();
        }
        let prev_country = PLACES[c.last_place].0;
        let prev_min = c.last_ts.map(|t| (now - t) / 60_000);
        let (country, city, currency, _) = PLACES[place];
        let payload = json!({
            "txn_id": format!("t-{:09}", self.seq),
            "card_id": c.id,
            "ts_ms": now,
            "amount": round2(amount),
            "currency": currency,
            "merchant": merchant,
            "mcc": cat.0,
            "merchant_category": cat.1,
            "channel": channel,
            "country": country,
            "city": city,
            "local_hour": local_hour,
            "card_home_country": PLACES[c.home].0,
            "card_avg_amount_30d": c.avg_amount,
            "card_txns_last_10min": c.recent.len(),
            "prev_txn_country": prev_country,
            "prev_txn_minutes_ago": prev_min,
        });
        c.recent.push_back(now);
        c.last_place = place;
        c.last_ts = Some(now);
        self.seq += 1;
        Generated { key: c.id.clone(), payload, pattern }
    }

    fn normal(&mut self) -> Generated {
        self.tick(4_000);
        let card = self.rng.gen_range(0..self.cards.len());
        let home = self.cards[card].home;
        // mostly at home; some legit travel (far from the last transaction in time)
        let recent = self.cards[card].last_ts.is_some_and(|t| self.clock_ms - t < 86_400_000);
        let place = if recent {
            self.cards[card].last_place
        } else if self.rng.gen_bool(0.95) {
            home
        } else {
            self.rng.gen_range(0..PLACES.len())
        };
        let cat = NORMAL[self.rng.gen_range(0..NORMAL.len())];
        let avg = self.cards[card].avg_amount;
        let amount = (avg * self.rng.gen_range(0.3..2.0)).max(1.0);
        let channel = ["pos", "contactless", "online"][self.rng.gen_range(0..3)];
        self.txn(card, place, amount, cat, channel, "none")
    }

    fn pattern(&mut self) {
        let which = PATTERNS[self.rng.gen_range(0..PATTERNS.len())];
        let card = self.rng.gen_range(0..self.cards.len());
        match which {
            "card_testing" => {
                let n = self.rng.gen_range(4..=8);
                let place = self.cards[card].home;
                for _ in 0..n {
                    self.tick(3_000);
                    let cat = TESTING[self.rng.gen_range(0..TESTING.len())];
                    let amount = self.rng.gen_range(0.5..3.0);
                    let g = self.txn(card, place, amount, cat, "online", which);
                    self.pending.push_back(g);
                }
            }
            "geo_impossible" => {
                self.tick(4_000);
                let home = self.cards[card].home;
                // a transaction at home minutes ago, now one on another continent
                self.cards[card].last_place = home;
                self.cards[card].last_ts = Some(self.clock_ms - self.rng.gen_range(2..40) * 60_000);
                let far = (home + PLACES.len() / 2 + self.rng.gen_range(0..2)) % PLACES.len();
                let far = if PLACES[far].0 == PLACES[home].0 { (far + 3) % PLACES.len() } else { far };
                let cat = NORMAL[self.rng.gen_range(0..NORMAL.len())];
                let amount = self.cards[card].avg_amount * self.rng.gen_range(1.0..4.0);
                let g = self.txn(card, far, amount, cat, "pos", which);
                self.pending.push_back(g);
            }
            "night_high_risk" => {
                self.tick(4_000);
                let nights: Vec<usize> = (0..PLACES.len()).filter(|p| self.local_hour(*p) <= 5).collect();
                let place = if nights.is_empty() { self.cards[card].home } else { nights[self.rng.gen_range(0..nights.len())] };
                let card = self.cards.iter().position(|c| c.home == place).unwrap_or(card);
                let cat = HIGH_RISK[self.rng.gen_range(0..HIGH_RISK.len())];
                let amount = self.cards[card].avg_amount * self.rng.gen_range(3.0..12.0);
                let g = self.txn(card, place, amount, cat, "online", which);
                self.pending.push_back(g);
            }
            _ => {
                self.tick(4_000);
                let place = self.cards[card].home;
                let cat = NORMAL[[0usize, 3, 5][self.rng.gen_range(0..3)]];
                let amount = self.cards[card].avg_amount * self.rng.gen_range(10.0..40.0);
                let g = self.txn(card, place, amount, cat, "online", which);
                self.pending.push_back(g);
            }
        }
    }
}

impl EventGenerator for FraudGenerator {
    fn next_event(&mut self) -> Generated {
        if let Some(g) = self.pending.pop_front() {
            return g;
        }
        if self.rng.gen_bool(self.start_p) {
            self.pattern();
            if let Some(g) = self.pending.pop_front() {
                return g;
            }
        }
        self.normal()
    }
}
