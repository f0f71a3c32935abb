//! The value rules in the OpenAPI document come from `flashsale-domain`, the
//! same constants the services check with, so the published contract cannot
//! drift from what the gateway, inventory and wallet accept. (utoipa takes
//! only string literals in its `pattern` attributes, so the patterns are set
//! here, on the built document, instead of in the handlers' annotations.)

use flashsale_domain::{Currency, IdempotencyKey, ItemId, OrderId, UserId};
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
    ("TopUpBody", "idempotency_key", IdempotencyKey::PATTERN),
    ("Price", "currency", Currency::PATTERN),
    ("Amount", "currency", Currency::PATTERN),
];

/// Sets every rule's pattern. Returns the property rules that found no such
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
    missing
}

fn spec_property<'a>(spec: &'a mut OpenApi, schema: &str, property: &str) -> Option<&'a mut RefOr<Schema>> {
    match spec.components.as_mut()?.schemas.get_mut(schema)? {
        RefOr::T(Schema::Object(object)) => object.properties.get_mut(property),
        _ => None,
    }
}

/// On a string schema, or on the string member of an `Option`'s composite.
fn set_pattern(schema: &mut RefOr<Schema>, pattern: &str) {
    match schema {
        RefOr::T(Schema::Object(object)) => object.pattern = Some(pattern.to_owned()),
        RefOr::T(Schema::OneOf(one_of)) => one_of.items.iter_mut().for_each(|s| set_pattern(s, pattern)),
        RefOr::T(Schema::AllOf(all_of)) => all_of.items.iter_mut().for_each(|s| set_pattern(s, pattern)),
        RefOr::T(Schema::AnyOf(any_of)) => any_of.items.iter_mut().for_each(|s| set_pattern(s, pattern)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_lands_on_its_field() {
        let mut spec = super::super::api_routes().1;
        assert_eq!(apply(&mut spec), Vec::<String>::new());
        let json = serde_json::to_value(&spec).unwrap();
        let pattern_of = |pointer: &str| json.pointer(pointer).and_then(|v| v.as_str()).map(str::to_owned);
        let schema = |name: &str, property: &str| format!("/components/schemas/{name}/properties/{property}/pattern");
        assert_eq!(pattern_of(&schema("PurchaseBody", "item_id")).as_deref(), Some(ItemId::PATTERN));
        assert_eq!(pattern_of(&schema("CreateItemBody", "id")).as_deref(), Some(ItemId::PATTERN));
        assert_eq!(pattern_of(&schema("Price", "currency")).as_deref(), Some(Currency::PATTERN));
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
        let named: std::collections::BTreeSet<String> = PARAMETERS.iter().map(|(n, _)| (*n).to_owned()).collect();
        assert_eq!(seen, named, "a parameter rule matches no parameter");
    }
}
