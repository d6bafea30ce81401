//! Where an R4B client meets an R4 server: the CapabilityStatement, the `fhirVersion` media
//! type parameter, R4 resource types that R4B dropped, and real R4 data (Synthea, the official
//! R4 examples) parsed through the R4B models. Plain HTTP here is setup (loading data) or the
//! raw view a diagnosis needs; every read a user would do goes through the client.

use std::{collections::BTreeMap, path::Path};

use fhir_sdk::{
    client::{Error as SdkError, ResourceWrite, SearchParameters},
    extensions::AnyResource,
    header,
    r4b::{
        codes::{PublicationStatus, ResourceType as TypeCode, SubscriptionNotificationType},
        resources::{Resource, SubscriptionStatus, SubscriptionTopic},
        types::Reference,
    },
    version::{FhirR4B, FhirVersion},
    HttpClient, TryStreamExt,
};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{value::RawValue, Value};

use crate::{
    fidelity::{round_trip, summary, Change, Tally},
    report::{ensure, Context, Describe, Outcome, Report},
    rest::Run,
};

/// Resource types of R4B 4.3.0 that R4 4.0.1 does not have.
const R4B_ONLY: [&str; 13] = [
    "AdministrableProductDefinition",
    "Citation",
    "ClinicalUseDefinition",
    "EvidenceReport",
    "Ingredient",
    "ManufacturedItemDefinition",
    "MedicinalProductDefinition",
    "NutritionProduct",
    "PackagedProductDefinition",
    "RegulatedAuthorization",
    "SubscriptionStatus",
    "SubscriptionTopic",
    "SubstanceDefinition",
];

/// A search page size that makes Synthea's 327 Observations span several pages.
const PAGE: &str = "100";

pub struct Gaps<'a> {
    pub run: &'a Run,
    /// For setup only: loading data the way any HTTP client would.
    pub http: HttpClient,
    pub base: String,
}

impl Gaps<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base.trim_end_matches('/'))
    }

    /// `client.capabilities()` parses as an R4B CapabilityStatement; it says R4.
    pub async fn capabilities(&self) -> Result<(String, Vec<String>), String> {
        let cs = self.run.client.capabilities().await.ctx("GET /metadata")?;
        let resources = cs.rest.iter().flatten().flat_map(|rest| rest.resource.iter().flatten());
        let types: Vec<String> = resources.clone().map(|r| r.r#type.as_ref().to_owned()).collect();
        // R4B's ResourceType code list keeps a name it does not know as `_Custom`.
        let unknown: Vec<&str> = resources
            .filter_map(|r| match &r.r#type {
                TypeCode::_Custom(name) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        ensure(cs.fhir_version.as_ref() == "4.0.1", || format!("fhirVersion {}, expected 4.0.1", cs.fhir_version))?;
        let detail = format!(
            "parses as R4B; fhirVersion 4.0.1; {} types, {} unknown to R4B (kept as _Custom): {}",
            types.len(),
            unknown.len(),
            unknown.join(" ")
        );
        Ok((detail, types))
    }

    /// The server claims fhirVersion 4.0.1, so it must not list a type that R4 lacks.
    pub fn capabilities_r4_only(types: &[String]) -> Outcome {
        let r4b: Vec<&str> = types.iter().map(String::as_str).filter(|t| R4B_ONLY.contains(t)).collect();
        ensure(r4b.is_empty(), || {
            format!("CapabilityStatement (fhirVersion 4.0.1) lists R4B-only types: {}", r4b.join(" "))
        })?;
        Ok(format!("{} types, none of them R4B-only", types.len()))
    }

    /// What the SDK's `fhirVersion=4.3` media type gets from an R4 server.
    pub async fn version_negotiation(&self) -> Outcome {
        let url = self.url("metadata");
        let response = self
            .run
            .client
            .send_custom_request(|http| http.get(url).header(header::ACCEPT, FhirR4B::MIME_TYPE))
            .await
            .ctx(format!("GET /metadata, Accept: {}", FhirR4B::MIME_TYPE))?;
        let status = response.status();
        let content_type =
            response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        ensure(status.is_success(), || format!("HTTP {status}"))?;
        // Serving R4 is right; labelling it 4.3 would be a lie the SDK believes.
        ensure(!content_type.to_lowercase().contains("fhirversion=4.3"), || {
            format!("R4 content labelled {content_type}")
        })?;
        Ok(format!(
            "Accept: {} answered {status} with R4 content, content-type `{content_type}` (the parameter is ignored, not refused)",
            FhirR4B::MIME_TYPE
        ))
    }

    /// Setup: stores `body` with a plain POST, answers its id.
    async fn store(&self, body: &Value) -> Result<String, String> {
        let resource_type = body.get("resourceType").and_then(Value::as_str).unwrap_or_default();
        let step = format!("setup: POST /{resource_type}");
        let response = self
            .http
            .post(self.url(resource_type))
            .header(header::CONTENT_TYPE, "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .map_err(SdkError::from)
            .ctx(&step)?;
        let status = response.status();
        let text = response.text().await.map_err(SdkError::from).ctx(&step)?;
        ensure(status.as_u16() == 201, || format!("{step} {body} → {status} {}", short(&text)))?;
        let stored: Value = serde_json::from_str(&text).ctx(&step)?;
        stored.get("id").and_then(Value::as_str).map(str::to_owned).ctx(format!("{step}: id"))
    }

    /// An R4-only resource type on the server cannot be read through R4B: `Resource` has no
    /// variant for it, and a search page holding one fails whole, its other entries with it.
    /// Passes while the gap is exactly the documented one.
    pub async fn r4_only_type(&self) -> Outcome {
        let product = self
            .store(&serde_json::json!({
                "resourceType": "MedicinalProduct",
                "name": [{"productName": "fhir-sdk conformance product"}]
            }))
            .await?;
        let patient = self.store(&serde_json::json!({"resourceType": "Patient", "active": true})).await?;

        let reference =
            Reference::builder().reference(format!("MedicinalProduct/{product}")).build().ctx("Reference builder")?;
        let read = match self.run.client.read_referenced(&reference).await {
            Err(e) => decode_error(&e).ctx("read_referenced")?,
            Ok(resource) => return Err(format!("R4B read an R4-only type as {}", resource.resource_type())),
        };
        let search = self
            .run
            .client
            .search_all(
                SearchParameters::empty()
                    .and_raw("_type", "MedicinalProduct,Patient")
                    .and_raw("_id", format!("{product},{patient}")),
            )
            .await;
        let search = match search {
            Err(e) => decode_error(&e).ctx("search_all")?,
            Ok(page) => {
                return Err(format!("search page with a MedicinalProduct parsed ({} entries)", page.entries().count()))
            }
        };
        ensure(read.contains("`MedicinalProduct`") && search.contains("`MedicinalProduct`"), || {
            format!("expected unknown variant `MedicinalProduct`, got: {read} / {search}")
        })?;
        Ok(format!(
            "documented gap: read MedicinalProduct/{product} fails ({read}); so does GET /?_type=MedicinalProduct,Patient, Patient/{patient} included"
        ))
    }

    /// R4 data that R4B's model cannot decode, stored (setup) and read through the client as
    /// `R`: passes while the read fails with `why` in the message, the documented gap.
    pub async fn decode_gap<R>(&self, body: Value, why: &str) -> Outcome
    where
        R: AnyResource<FhirR4B> + DeserializeOwned + std::fmt::Debug,
    {
        let id = self.store(&body).await?;
        let location = format!("{}/{id}", R::TYPE_STR);
        match self.run.client.read::<R>(&id).await {
            Err(e) => {
                let error = decode_error(&e).ctx(format!("read {location}"))?;
                ensure(error.contains(why), || {
                    format!("read {location}: expected a decode error about {why}, got {error}")
                })?;
                Ok(format!("documented gap: {body} stored as {location}, the R4B read fails: {error}"))
            }
            Ok(read) => Err(format!("R4B read {location}: {read:?}")),
        }
    }

    /// Resource types the R4B client can build but R4 lacks must be refused by an R4 server.
    pub async fn r4b_only_types(&self) -> Outcome {
        let mut topic = SubscriptionTopic::builder()
            .url(format!("urn:fhir-ledger:conformance:topic:{}", self.run.tag))
            .status(PublicationStatus::Active)
            .build()
            .ctx("SubscriptionTopic builder")?;
        let mut status = SubscriptionStatus::builder()
            .r#type(SubscriptionNotificationType::Heartbeat)
            .subscription(
                Reference::builder().reference("Subscription/none".to_owned()).build().ctx("Reference builder")?,
            )
            .build()
            .ctx("SubscriptionStatus builder")?;
        let (mut accepted, mut refused) = (Vec::new(), Vec::new());
        for outcome in [
            self.try_create("SubscriptionTopic", &mut topic).await?,
            self.try_create("SubscriptionStatus", &mut status).await?,
        ] {
            match outcome {
                Ok(created) => accepted.push(created),
                Err(why) => refused.push(why),
            }
        }
        ensure(accepted.is_empty(), || format!("R4 server accepted R4B-only types: {}", accepted.join("; ")))?;
        Ok(format!("refused: {}", refused.join("; ")))
    }

    /// `ResourceWrite::create`: `Ok(request → response)` if the server took it, `Err(why not)`.
    async fn try_create<R>(&self, name: &str, resource: &mut R) -> Result<Result<String, String>, String>
    where
        R: ResourceWrite<FhirR4B>,
    {
        let sent = serde_json::to_string(resource).ctx("serialize")?;
        Ok(match resource.create(&self.run.client).await {
            Ok(id) => Ok(format!("POST /{name} {sent} → 201 {name}/{id}")),
            Err(e) => Err(format!("{name} {}", e.describe())),
        })
    }

    /// POSTs a transaction Bundle file (setup) and answers the resource types it holds.
    pub async fn load(&self, path: &Path) -> Result<(String, BTreeMap<String, usize>), String> {
        let text = std::fs::read_to_string(path).ctx(format!("read {}", path.display()))?;
        let bundle: Value = serde_json::from_str(&text).ctx("bundle JSON")?;
        let mut types = BTreeMap::new();
        for entry in bundle.get("entry").and_then(Value::as_array).into_iter().flatten() {
            if let Some(t) = entry.pointer("/resource/resourceType").and_then(Value::as_str) {
                *types.entry(t.to_owned()).or_insert(0) += 1;
            }
        }
        let response = self
            .http
            .post(self.url(""))
            .header(header::CONTENT_TYPE, "application/fhir+json")
            .body(text)
            .send()
            .await
            .map_err(SdkError::from)
            .ctx("POST transaction")?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(format!("POST {} → {status}: {}", path.display(), short(&body)));
        }
        let total: usize = types.values().sum();
        Ok((format!("{total} resources of {} types from {}", types.len(), path.display()), types))
    }

    /// `GET /{type}?_count=100` through the client's search API (typed: the R4B `Resource`
    /// enum, every page), then the same pages raw, each resource parsed on its own and its
    /// round trip compared, which says which resource failed and what R4B lost.
    pub async fn read_type(&self, resource_type: &str, at_least: usize) -> Outcome {
        let url = self.url(resource_type);
        let typed: Result<Vec<Resource>, String> = match self
            .run
            .client
            .search_custom::<Resource, _>(|http| {
                http.get(url.clone()).query(&[("_count", PAGE)]).header(header::ACCEPT, FhirR4B::MIME_TYPE)
            })
            .await
        {
            Ok(page) => page.all_matches().try_collect().await.ctx("next pages"),
            Err(e) => Err(format!("first page: {}", e.describe())),
        };

        let mut tally = Tally::new();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        let (mut seen, mut pages) = (0, 0);
        let mut next = Some(format!("{url}?_count={PAGE}"));
        while let Some(page_url) = next.take() {
            pages += 1;
            ensure(pages <= 1000, || "more than 1000 pages".into())?;
            let text = self.raw_text(&page_url).await?;
            let page: RawPage = serde_json::from_str(&text).ctx(format!("GET {page_url} JSON"))?;
            for resource in page.entry.iter().filter_map(|e| e.resource) {
                seen += 1;
                if let Err(e) = round_trip(resource.get(), &mut tally) {
                    *errors.entry(short(&e.to_string())).or_default() += 1;
                }
            }
            next = page.link.iter().find(|l| l.relation == "next").map(|l| l.url.clone());
        }

        let lossy = summary(&tally, Change::loses_data);
        let reformatted = summary(&tally, |c| !c.loses_data());
        let parsed = seen - errors.values().sum::<usize>();
        let mut problems = Vec::new();
        if let Err(e) = &typed {
            problems.push(format!("typed search failed: {e}"));
        }
        for (error, n) in &errors {
            problems.push(format!("{n} fail to parse: {error}"));
        }
        if !lossy.is_empty() {
            problems.push(format!("round trip: {lossy}"));
        }
        if seen < at_least {
            problems.push(format!("only {seen} found, loaded {at_least}"));
        }
        let typed_count = typed.as_ref().map_or(0, Vec::len);
        if typed.is_ok() && typed_count != seen {
            problems.push(format!("typed search streamed {typed_count}, raw pages hold {seen}"));
        }
        let reformatted = if reformatted.is_empty() { String::new() } else { format!("; {reformatted}") };
        ensure(problems.is_empty(), || format!("{} ({parsed}/{seen} parse){reformatted}", problems.join("; ")))?;
        Ok(format!("{seen} over {pages} page(s), typed and raw; all parse as R4B, lossless{reformatted}"))
    }

    /// The official R4 examples: each PUT as it is (setup), read back through the client as
    /// an R4B `Resource` and compared. One line per example that R4B cannot carry, one for
    /// the rest.
    pub async fn examples(&self, dir: &Path, report: &mut Report) -> Result<(), String> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .ctx(format!("read {}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let (mut clean, mut refused) = (Vec::new(), Vec::new());
        let mut tally = Tally::new();
        for path in files {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match self.example(&path, &mut tally).await {
                Ok(Some(())) => clean.push(name),
                Ok(None) => refused.push(name),
                Err(e) => report.record(&format!("r4-example {name}"), Err(e)),
            }
        }
        let refused = if refused.is_empty() {
            String::new()
        } else {
            format!("; not stored (the server refuses them as invalid R4, see test_examples.py): {}", refused.join(" "))
        };
        let precision = summary(&tally, |c| c == Change::Precision);
        let precision = if precision.is_empty() { String::new() } else { format!("; {precision}") };
        report.record(
            "r4-examples",
            Ok(format!("{} examples read through R4B losslessly{refused}{precision}", clean.len())),
        );
        Ok(())
    }

    /// `Ok(None)`: the server refused the example (setup, not this client's business).
    /// Adds the example's round-trip differences to `all`.
    async fn example(&self, path: &Path, all: &mut Tally) -> Result<Option<()>, String> {
        let text = std::fs::read_to_string(path).ctx("read")?;
        let sent: Value = serde_json::from_str(&text).ctx("JSON")?;
        let resource_type = sent.get("resourceType").and_then(Value::as_str).ctx("resourceType")?.to_owned();
        let request = match sent.get("id").and_then(Value::as_str) {
            Some(id) => self.http.put(self.url(&format!("{resource_type}/{id}"))),
            None => self.http.post(self.url(&resource_type)),
        };
        let response = request
            .header(header::CONTENT_TYPE, "application/fhir+json")
            .body(text)
            .send()
            .await
            .map_err(SdkError::from)
            .ctx("setup: store")?;
        if response.status().is_client_error() {
            return Ok(None);
        }
        ensure(response.status().is_success(), || format!("setup: store → {}", response.status()))?;
        let stored: Value = serde_json::from_str(&response.text().await.map_err(SdkError::from).ctx("setup: body")?)
            .ctx("setup: response JSON")?;
        let id = stored.get("id").and_then(Value::as_str).ctx("setup: id")?;
        let location = format!("{resource_type}/{id}");

        let reference = Reference::builder().reference(location.clone()).build().ctx("Reference builder")?;
        let typed = self.run.client.read_referenced(&reference).await;
        let raw = self.raw_text(&self.url(&location)).await?;
        let mut tally = Tally::new();
        let parsed = round_trip(&raw, &mut tally);
        let lossy = summary(&tally, Change::loses_data);
        for (key, (n, sample)) in tally {
            all.entry(key).or_insert_with(|| (0, sample)).0 += n;
        }
        match (typed, parsed) {
            (Ok(_), Ok(())) if lossy.is_empty() => Ok(Some(())),
            (Ok(_), Ok(())) => Err(format!("{location}: round trip: {lossy}")),
            (_, Err(e)) => Err(format!("{location}: does not parse as R4B: {}", short(&e.to_string()))),
            (Err(e), Ok(())) => Err(format!("{location}: read_referenced: {}", e.describe())),
        }
    }

    /// A GET through the client's own machinery, the body as the server sent it.
    async fn raw_text(&self, url: &str) -> Result<String, String> {
        let response = self
            .run
            .client
            .send_custom_request(|http| http.get(url).header(header::ACCEPT, FhirR4B::MIME_TYPE))
            .await
            .ctx(format!("GET {url}"))?;
        let status = response.status();
        let text = response.text().await.map_err(SdkError::from).ctx(format!("GET {url} body"))?;
        ensure(status.is_success(), || format!("GET {url} → {status}: {}", short(&text)))?;
        Ok(text)
    }
}

/// A search page with each resource left as the server's text.
#[derive(Deserialize)]
struct RawPage<'a> {
    #[serde(default, borrow)]
    entry: Vec<RawEntry<'a>>,
    #[serde(default)]
    link: Vec<Link>,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Link {
    relation: String,
    url: String,
}

/// The serde message of a response body that did not decode (reqwest keeps it as the source).
fn decode_error(error: &SdkError) -> Result<String, String> {
    match error {
        SdkError::Request(e) if e.is_decode() => {
            Ok(short(&std::error::Error::source(e).map_or_else(|| e.to_string(), ToString::to_string)))
        }
        other => Err(format!("expected a decode error, got {}", other.describe())),
    }
}

/// A serde error about an unknown `resourceType` lists all 141 R4B types; the first clause says it.
fn short(message: &str) -> String {
    let cut = message.find(", expected one of").unwrap_or(message.len()).min(300);
    let mut end = cut;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_owned()
}
