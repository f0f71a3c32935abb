//! The value rules in the OpenAPI document come from `flashsale-domain`, the
//! same constants the services check with, so the published contract cannot
//! drift from what the gateway, inventory and wallet accept. (utoipa takes
//! only literals in its `pattern`, `minimum` and `maximum` attributes, so the
//! rules are set here, on the built document, instead of in the handlers'
//! annotations.)

use flashsale_domain::{
    Currency, IdempotencyKey, ItemId, MAX_ADMISSION_BUCKETS, MAX_AMOUNT_MINOR, MAX_PAGE_SIZE, MAX_PER_USER_LIMIT,
    MAX_PRICE_MINOR, MAX_STOCK, OrderId, TopUpKey, UserId,
};
use utoipa::Number;
use utoipa::openapi::schema::Schema;
use utoipa::openapi::{OpenApi, RefOr};

/// Parameters (path, query or header), by name.
const PARAMETERS: &[(&str, &str)] = &[
    ("item_id", ItemId::PATTERN),
    ("order_id", OrderId::PATTERN),
    ("user_id", UserId::PATTERN),
    ("Idempotency-Key", IdempotencyKey::PATTERN),
    ("currency", Currency::PATTERN),
];

/// Request body properties, by schema and property.
const PROPERTIES: &[(&str, &str, &str)] = &[
    ("PurchaseBody", "item_id", ItemId::PATTERN),
    ("CreateItemBody", "id", ItemId::PATTERN),
    ("TopUpBody", "idempotency_key", TopUpKey::PATTERN),
    ("Price", "currency", Currency::PATTERN),
    ("Amount", "currency", Currency::PATTERN),
];

/// Numeric request body properties: schema, property, minimum, maximum.
const BOUNDS: &[(&str, &str, Option<i64>, i64)] = &[
    ("Price", "amount_minor", Some(1), MAX_PRICE_MINOR),
    ("Amount", "amount_minor", Some(1), MAX_AMOUNT_MINOR),
    ("PurchaseBody", "quantity", Some(1), MAX_PER_USER_LIMIT as i64),
    ("CreateItemBody", "stock_total", None, MAX_STOCK as i64),
    ("CreateItemBody", "per_user_limit", Some(1), MAX_PER_USER_LIMIT as i64),
    ("CreateItemBody", "admission_buckets", None, MAX_ADMISSION_BUCKETS as i64),
];

/// Numeric parameters: name, maximum.
const PARAMETER_BOUNDS: &[(&str, i64)] = &[("page_size", MAX_PAGE_SIZE as i64)];

/// Sets every rule's pattern and bounds. Returns the property rules that found no such
/// schema property (a test keeps that empty, so a renamed field cannot
/// silently lose its pattern).
pub(super) fn apply(spec: &mut OpenApi) -> Vec<String> {
    for item in spec.paths.paths.values_mut() {
        let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
        for operation in operations.into_iter().flatten() {
            for parameter in operation.parameters.iter_mut().flatten() {
                let RefOr::T(parameter) = parameter else { continue };
                if let Some((_, pattern)) = PARAMETERS.iter().find(|(name, _)| *name == parameter.name)
                    && let Some(schema) = parameter.schema.as_mut()
                {
                    set_pattern(schema, pattern);
                }
                if let Some((_, maximum)) = PARAMETER_BOUNDS.iter().find(|(name, _)| *name == parameter.name)
                    && let Some(schema) = parameter.schema.as_mut()
                {
                    set_bounds(schema, None, *maximum);
                }
            }
        }
    }
    let mut missing = Vec::new();
    for (schema_name, property, pattern) in PROPERTIES {
        let found = spec_property(spec, schema_name, property).map(|schema| set_pattern(schema, pattern)).is_some();
        if !found {
            missing.push(format!("{schema_name}.{property}"));
        }
    }
    for (schema_name, property, minimum, maximum) in BOUNDS {
        let found =
            spec_property(spec, schema_name, property).map(|schema| set_bounds(schema, *minimum, *maximum)).is_some();
        if !found {
            missing.push(format!("{schema_name}.{property}"));
        }
    }
    missing
}

fn spec_property<'a>(spec: &'a mut OpenApi, schema: &str, property: &str) -> Option<&'a mut RefOr<Schema>> {
    match spec.components.as_mut()?.schemas.get_mut(schema)? {
        RefOr::T(Schema::Object(object)) => object.properties.get_mut(property),
        _ => None,
    }
}

/// `set` on the schema itself, or on every member of an `Option`'s composite
/// (utoipa writes `Option<T>` as a one-of of `T` and null).
fn on_members(schema: &mut RefOr<Schema>, set: &mut impl FnMut(&mut utoipa::openapi::schema::Object)) {
    match schema {
        RefOr::T(Schema::Object(object)) => set(object),
        RefOr::T(Schema::OneOf(one_of)) => one_of.items.iter_mut().for_each(|s| on_members(s, set)),
        RefOr::T(Schema::AllOf(all_of)) => all_of.items.iter_mut().for_each(|s| on_members(s, set)),
        RefOr::T(Schema::AnyOf(any_of)) => any_of.items.iter_mut().for_each(|s| on_members(s, set)),
        _ => {}
    }
}

fn set_pattern(schema: &mut RefOr<Schema>, pattern: &str) {
    on_members(schema, &mut |object| object.pattern = Some(pattern.to_owned()));
}

fn set_bounds(schema: &mut RefOr<Schema>, minimum: Option<i64>, maximum: i64) {
    let number = |n: i64| Number::Int(isize::try_from(n).unwrap_or(isize::MAX));
    on_members(schema, &mut |object| {
        if let Some(minimum) = minimum {
            object.minimum = Some(number(minimum));
        }
        object.maximum = Some(number(maximum));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_lands_on_its_field() {
        // The document as served at /openapi.json.
        let spec = super::super::openapi();
        // Every property rule names a property that exists.
        assert_eq!(apply(&mut spec.clone()), Vec::<String>::new());
        let json = serde_json::to_value(&spec).unwrap();
        let pattern_of = |pointer: &str| json.pointer(pointer).and_then(|v| v.as_str()).map(str::to_owned);
        let schema = |name: &str, property: &str| format!("/components/schemas/{name}/properties/{property}/pattern");
        assert_eq!(pattern_of(&schema("PurchaseBody", "item_id")).as_deref(), Some(ItemId::PATTERN));
        assert_eq!(pattern_of(&schema("CreateItemBody", "id")).as_deref(), Some(ItemId::PATTERN));
        assert_eq!(pattern_of(&schema("Price", "currency")).as_deref(), Some(Currency::PATTERN));
        let bound = |name: &str, property: &str, which: &str| {
            json.pointer(&format!("/components/schemas/{name}/properties/{property}/{which}")).and_then(|v| v.as_i64())
        };
        assert_eq!(bound("Price", "amount_minor", "maximum"), Some(MAX_PRICE_MINOR));
        assert_eq!(bound("Amount", "amount_minor", "maximum"), Some(MAX_AMOUNT_MINOR));
        assert_eq!(bound("PurchaseBody", "quantity", "maximum"), Some(i64::from(MAX_PER_USER_LIMIT)));
        assert_eq!(bound("CreateItemBody", "per_user_limit", "minimum"), Some(1));
        assert_eq!(bound("CreateItemBody", "stock_total", "maximum"), Some(i64::from(MAX_STOCK)));
        // Properties that are `Option`s carry the pattern on their string member.
        let text = json.pointer("/components/schemas/TopUpBody/properties/idempotency_key").unwrap().to_string();
        assert!(text.contains(&serde_json::to_string(TopUpKey::PATTERN).unwrap()), "{text}");
        // Every parameter the table names carries its pattern wherever it appears.
        let mut seen = std::collections::BTreeSet::new();
        for (path, item) in json["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                for parameter in operation["parameters"].as_array().into_iter().flatten() {
                    let name = parameter["name"].as_str().unwrap();
                    if let Some((_, want)) = PARAMETERS.iter().find(|(n, _)| *n == name) {
                        let text = parameter["schema"].to_string();
                        assert!(text.contains(&serde_json::to_string(want).unwrap()), "{method} {path} {name}: {text}");
                        seen.insert(name.to_owned());
                    }
                }
            }
        }
        let page_sizes: Vec<String> = json["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .flat_map(|operation| operation["parameters"].as_array().cloned().unwrap_or_default())
            .filter(|parameter| parameter["name"] == "page_size")
            .map(|parameter| parameter["schema"].to_string())
            .collect();
        assert!(!page_sizes.is_empty(), "no page_size parameter");
        for text in page_sizes {
            assert!(text.contains(&format!("\"maximum\":{MAX_PAGE_SIZE}")), "page_size: {text}");
        }
        let named: std::collections::BTreeSet<String> = PARAMETERS.iter().map(|(n, _)| (*n).to_owned()).collect();
        assert_eq!(seen, named, "a parameter rule matches no parameter");
    }
}
