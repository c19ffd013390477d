//! Vocabularies and identifier helpers: the 8 domains' word lists (packages, modules,
//! classes, nouns, measures, labels, keys, error class), the suffixes of class, wrapper
//! and decoy names, and the small string helpers every part of a task uses.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;

/// The word lists of one domain; every list is non-empty.
pub(super) struct Domain {
    /// What a user of the package does with it (for the report's intro).
    pub(super) activity: &'static str,
    pub(super) packages: &'static [&'static str],
    pub(super) modules: &'static [&'static str],
    pub(super) classes: &'static [&'static str],
    /// Lower-case nouns with a plain `s` plural.
    pub(super) nouns: &'static [&'static str],
    /// Numeric quantities (parameter and field names).
    pub(super) measures: &'static [&'static str],
    /// String identifiers (parameter names).
    pub(super) labels: &'static [&'static str],
    /// Words used as lookup keys, counted tags, option keys.
    pub(super) keys: &'static [&'static str],
    pub(super) error: &'static str,
}

#[rustfmt::skip]
pub(super) const DOMAINS: &[Domain] = &[
    Domain {
        activity: "track stock levels across our warehouses",
        packages: &["stockroom", "shelfmate", "inventra"],
        modules: &["inventory", "warehouse", "orders", "suppliers", "catalog", "reports", "storage", "barcodes", "pricing", "transfers"],
        classes: &["Warehouse", "StockItem", "Order", "Supplier", "Shelf", "Catalog", "Shipment", "Ledger", "Bin", "Manifest"],
        nouns: &["item", "order", "pallet", "shipment", "supplier", "product", "crate", "bin"],
        measures: &["quantity", "weight", "units", "volume"],
        labels: &["sku", "code", "label"],
        keys: &["standard", "fragile", "bulk", "frozen", "hazardous", "oversized"],
        error: "StockError",
    },
    Domain {
        activity: "generate invoices for our customers",
        packages: &["ledgerly", "invoicer", "paytab"],
        modules: &["invoices", "payments", "accounts", "taxes", "currency", "discounts", "statements", "customers", "subscriptions", "refunds"],
        classes: &["Invoice", "Payment", "Account", "TaxRule", "Discount", "Statement", "Customer", "Subscription", "LineItem", "Refund"],
        nouns: &["invoice", "payment", "charge", "discount", "credit", "refund", "account", "voucher"],
        measures: &["amount", "price", "total", "balance"],
        labels: &["currency", "code", "reference"],
        keys: &["monthly", "yearly", "weekly", "trial", "premium", "basic"],
        error: "BillingError",
    },
    Domain {
        activity: "parse configuration and log files",
        packages: &["tokenix", "parsekit", "lexicon"],
        modules: &["lexer", "tokens", "grammar", "reader", "scanner", "config", "dates", "formats", "fields", "headers"],
        classes: &["Lexer", "Token", "Scanner", "Reader", "Grammar", "Field", "Header", "DateParser", "Record", "Schema"],
        nouns: &["token", "field", "header", "line", "date", "record", "column", "section"],
        measures: &["width", "offset", "length", "depth"],
        labels: &["name", "kind", "tag"],
        keys: &["integer", "string", "boolean", "datetime", "float", "symbol"],
        error: "ParseError",
    },
    Domain {
        activity: "compute layouts of 2D shapes",
        packages: &["polyform", "geomkit", "shapecraft"],
        modules: &["shapes", "vectors", "polygons", "transforms", "bounds", "grids", "points", "curves", "meshes", "projections"],
        classes: &["Point", "Vector", "Polygon", "Circle", "Rectangle", "BoundingBox", "Grid", "Transform", "Segment", "Mesh"],
        nouns: &["point", "vertex", "polygon", "edge", "segment", "shape", "tile", "triangle"],
        measures: &["distance", "radius", "area", "angle"],
        labels: &["name", "kind", "layer"],
        keys: &["square", "circle", "hexagon", "triangle", "ellipse", "diamond"],
        error: "GeometryError",
    },
    Domain {
        activity: "book meeting rooms and plan shifts",
        packages: &["timeslot", "agendum", "cronly"],
        modules: &["calendar", "events", "slots", "recurrence", "reminders", "timezones", "bookings", "rooms", "availability", "planner"],
        classes: &["Calendar", "Event", "Slot", "Booking", "Reminder", "Room", "Planner", "Recurrence", "Attendee", "Agenda"],
        nouns: &["event", "slot", "booking", "meeting", "reminder", "room", "shift", "session"],
        measures: &["duration", "minutes", "hours", "capacity"],
        labels: &["timezone", "name", "code"],
        keys: &["daily", "weekly", "monthly", "weekday", "weekend", "holiday"],
        error: "SchedulingError",
    },
    Domain {
        activity: "compute shipping rates for parcels",
        packages: &["parcelpost", "freightly", "shipwise"],
        modules: &["parcels", "routes", "carriers", "labels", "tracking", "rates", "zones", "customs", "packaging", "depots"],
        classes: &["Parcel", "Route", "Carrier", "Label", "Tracker", "RateTable", "Zone", "Depot", "Package", "Consignment"],
        nouns: &["parcel", "route", "carrier", "package", "zone", "label", "stop", "delivery"],
        measures: &["weight", "distance", "length", "cost"],
        labels: &["code", "country", "service"],
        keys: &["express", "economy", "standard", "overnight", "freight", "priority"],
        error: "ShippingError",
    },
    Domain {
        activity: "aggregate readings from our weather stations",
        packages: &["skywatch", "meteora", "climakit"],
        modules: &["stations", "readings", "forecast", "alerts", "units", "sensors", "history", "radar", "wind", "rainfall"],
        classes: &["Station", "Reading", "Forecast", "Alert", "Sensor", "Series", "RadarFrame", "WindProfile", "Gauge", "Observation"],
        nouns: &["reading", "station", "sensor", "sample", "alert", "forecast", "gust", "observation"],
        measures: &["temperature", "pressure", "humidity", "rainfall"],
        labels: &["unit", "station_id", "name"],
        keys: &["sunny", "cloudy", "rainy", "windy", "stormy", "foggy"],
        error: "WeatherError",
    },
    Domain {
        activity: "run the loans desk of a small library",
        packages: &["bookworm", "libris", "shelfie"],
        modules: &["books", "loans", "members", "catalog", "holds", "fines", "search", "authors", "branches", "circulation"],
        classes: &["Book", "Loan", "Member", "Catalog", "Hold", "Fine", "Author", "Branch", "Shelf", "Circulation"],
        nouns: &["book", "loan", "member", "hold", "fine", "copy", "title", "author"],
        measures: &["pages", "copies", "days", "fee"],
        labels: &["isbn", "code", "name"],
        keys: &["fiction", "poetry", "history", "science", "travel", "children"],
        error: "LibraryError",
    },
];

pub(super) const CLASS_SUFFIXES: &[&str] = &[
    "Manager", "Store", "Registry", "Service", "Index", "Cache", "Builder", "View",
];
pub(super) const WRAPPER_VERBS: &[&str] = &[
    "process", "handle", "submit", "run", "sync", "prepare", "export", "dispatch", "plan",
    "refresh",
];
pub(super) const DECOY_SUFFIXES: &[&str] = &[
    "all", "safe", "strict", "legacy", "batch", "raw", "cached", "fast", "v2", "many",
];

/// A uniformly chosen element of a non-empty word list (one RNG draw).
pub(super) fn pick<'a, T>(rng: &mut StdRng, xs: &'a [T]) -> &'a T {
    xs.choose(rng).expect("non-empty word list")
}

/// `MAX_WEIGHT` style: constants are named in upper case.
pub(super) fn upper(s: &str) -> String {
    s.to_ascii_uppercase()
}

/// `StockItem` -> `stock_item` (variable names for instances, test names).
pub(super) fn snake(class: &str) -> String {
    let mut out = String::new();
    for (i, c) in class.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `a word` / `an word`.
pub(super) fn article(word: &str) -> String {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {word}")
    } else {
        format!("a {word}")
    }
}

/// The first character in upper case.
pub(super) fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

/// Python's `repr` of a float that holds an integer value (`3.0`).
pub(super) fn py_float(v: i64) -> String {
    format!("{v}.0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_spell_identifiers() {
        assert_eq!(snake("StockItem"), "stock_item");
        assert_eq!(snake("Bin"), "bin");
        assert_eq!(article("item"), "an item");
        assert_eq!(article("pallet"), "a pallet");
        assert_eq!(capitalise("fragile"), "Fragile");
        assert_eq!(upper("max_weight"), "MAX_WEIGHT");
        assert_eq!(py_float(3), "3.0");
    }

    #[test]
    fn every_domain_has_enough_words() {
        for d in DOMAINS {
            assert!(d.modules.len() >= super::super::MAX_FILES, "{}", d.error);
            // Recipes sample 3 distinct keys; decoys and wrappers need some choice.
            assert!(d.keys.len() >= 3 && d.nouns.len() >= 2 && d.classes.len() >= 2);
            assert!(!d.packages.is_empty() && !d.measures.is_empty() && !d.labels.is_empty());
        }
    }
}
