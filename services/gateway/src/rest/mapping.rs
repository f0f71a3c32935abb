//! The REST routes as `gateway.proto` states them (`google.api.http`), checked
//! against the routes this gateway serves: a gRPC-JSON transcoder in front of
//! the gRPC port (Envoy's, grpc-gateway) then answers the same paths as the
//! gateway's own REST API. Test only: nothing at run time reads the options.

use std::collections::BTreeSet;

use flashsale_proto::google::api::HttpRule;
use flashsale_proto::google::api::http_rule::Pattern;
use prost::Message as _;

// Just the parts of `google.protobuf.FileDescriptorProto` the check reads,
// with `MethodOptions` extended by `google.api.http` (prost_types'
// descriptors drop extensions when decoding).
#[derive(Clone, PartialEq, prost::Message)]
struct File {
    #[prost(string, tag = "2")]
    package: String,
    #[prost(message, repeated, tag = "4")]
    messages: Vec<Message>,
    #[prost(message, repeated, tag = "6")]
    services: Vec<Service>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Message {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, repeated, tag = "2")]
    fields: Vec<Field>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Field {
    #[prost(string, tag = "1")]
    name: String,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Service {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, repeated, tag = "2")]
    methods: Vec<Method>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Method {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    input_type: String,
    #[prost(message, optional, tag = "4")]
    options: Option<MethodOptions>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct MethodOptions {
    #[prost(message, optional, tag = "72295728")]
    http: Option<HttpRule>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct FileSet {
    #[prost(message, repeated, tag = "1")]
    files: Vec<File>,
}

/// One route: HTTP method, path template, whether it takes a JSON body.
type Route = (String, String, bool);

/// Every RPC's route from the descriptor set the gateway ships
/// (`flashsale-gateway descriptor-set`), checking on the way that each
/// path variable names a field of the request.
fn annotated() -> (BTreeSet<Route>, Vec<String>) {
    assert_eq!(flashsale_proto::HTTP_RULE_EXTENSION, 72_295_728);
    let set = flashsale_proto::descriptor_set_of(crate::PUBLIC_PROTO_FILES).unwrap();
    let set = FileSet::decode(set.as_slice()).unwrap();
    let mut routes = BTreeSet::new();
    let mut problems = Vec::new();
    let gateway = set.files.iter().find(|file| file.package == "flashsale.gateway.v1").unwrap();
    for service in &gateway.services {
        for method in &service.methods {
            let rpc = format!("{}/{}", service.name, method.name);
            let Some(rule) = method.options.as_ref().and_then(|options| options.http.as_ref()) else {
                problems.push(format!("{rpc} has no google.api.http option"));
                continue;
            };
            let (verb, path) = match &rule.pattern {
                Some(Pattern::Get(path)) => ("get", path),
                Some(Pattern::Post(path)) => ("post", path),
                Some(Pattern::Put(path)) => ("put", path),
                Some(Pattern::Delete(path)) => ("delete", path),
                Some(Pattern::Patch(path)) => ("patch", path),
                other => {
                    problems.push(format!("{rpc}: unexpected pattern {other:?}"));
                    continue;
                }
            };
            if !matches!(rule.body.as_str(), "" | "*") {
                problems.push(format!("{rpc}: body {:?} (the REST bodies are whole requests)", rule.body));
            }
            if !rule.additional_bindings.is_empty() {
                problems.push(format!("{rpc}: additional bindings the REST API does not serve"));
            }
            let request = method.input_type.rsplit('.').next().unwrap_or_default();
            let fields = gateway.messages.iter().find(|m| m.name == request).map(|m| &m.fields);
            for variable in path.split('{').skip(1).filter_map(|rest| rest.split('}').next()) {
                if !fields.is_some_and(|fields| fields.iter().any(|field| field.name == variable)) {
                    problems.push(format!("{rpc}: path variable {{{variable}}} is no field of {request}"));
                }
            }
            routes.insert((verb.to_owned(), path.clone(), rule.body == "*"));
        }
    }
    (routes, problems)
}

/// Every API route the gateway serves, from its OpenAPI document (built
/// from the same handlers as its router), but the probes.
fn served() -> BTreeSet<Route> {
    let json = serde_json::to_value(super::openapi()).unwrap();
    let mut routes = BTreeSet::new();
    for (path, item) in json["paths"].as_object().unwrap() {
        if matches!(path.as_str(), "/healthz" | "/readyz") {
            continue;
        }
        for (verb, operation) in item.as_object().unwrap() {
            routes.insert((verb.clone(), path.clone(), operation.get("requestBody").is_some()));
        }
    }
    routes
}

#[test]
fn every_rpc_is_annotated_with_the_rest_route_the_gateway_serves() {
    let (annotated, problems) = annotated();
    assert_eq!(problems, Vec::<String>::new());
    let served = served();
    let only_annotated: Vec<_> = annotated.difference(&served).collect();
    let only_served: Vec<_> = served.difference(&annotated).collect();
    assert!(
        only_annotated.is_empty() && only_served.is_empty(),
        "gateway.proto's google.api.http options and the REST routes disagree (method, path, body):\n  \
         annotated only: {only_annotated:?}\n  served only: {only_served:?}"
    );
    // Eight buyer RPCs and three admin RPCs.
    assert_eq!(annotated.len(), 11);
}

#[test]
fn the_shipped_descriptor_set_is_the_one_built_from_proto() {
    // The Istio transcoder option mounts this file; it must say what the gateway serves.
    let shipped =
        include_bytes!("../../../../deploy/k8s/components/istio-grpc-json-transcoder/flashsale-gateway.binpb");
    let built = flashsale_proto::descriptor_set_of(crate::PUBLIC_PROTO_FILES).unwrap();
    assert!(
        shipped.as_slice() == built.as_slice(),
        "the shipped descriptor set is stale; regenerate it: cargo run -p flashsale-gateway -- descriptor-set > \
         deploy/k8s/components/istio-grpc-json-transcoder/flashsale-gateway.binpb"
    );
}
