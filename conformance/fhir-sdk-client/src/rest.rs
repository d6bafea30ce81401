//! The REST checks, written as a Rust user of fhir-sdk would: typed R4B builders, the client's
//! CRUD, search, paging, batch and transaction API.

use std::collections::BTreeSet;

use fhir_sdk::{
    client::{
        r4b::{DateSearch, ReferenceSearch},
        Client, Page, ResourceWrite, SearchParameters, StringSearch, TokenSearch,
    },
    r4b::{
        codes::{AdministrativeGender, BundleType, HTTPVerb, ObservationStatus, SearchComparator},
        resources::{
            BaseResource, Bundle, BundleEntry, BundleEntryRequest, Observation, ObservationEffective, ObservationValue,
            Patient, Resource, ResourceType,
        },
        types::{CodeableConcept, Coding, HumanName, Identifier, Quantity, Reference},
    },
    version::FhirR4B,
    Date, DateTime, TryStreamExt,
};

use crate::report::{ensure, Context, Describe, Outcome};

pub type R4bClient = Client<FhirR4B>;

/// The identifier system of every resource this run writes.
const MRN_SYSTEM: &str = "urn:fhir-ledger:conformance:fhir-sdk";
const BIRTH_DATE: &str = "1970-01-02";

/// What the checks share: the client and this run's tag, which makes every identifier and
/// family name unique so that a rerun against the same server finds only its own resources.
pub struct Run {
    pub client: R4bClient,
    pub tag: String,
}

/// What the create check made (the SDK set their ids and versions), for the checks after it.
pub struct Created {
    pub patient: Patient,
    pub observation: Observation,
}

impl Run {
    fn family(&self, what: &str) -> String {
        format!("Sdk{what}{}", self.tag)
    }

    fn patient(family: &str, mrn: &str) -> Result<Patient, String> {
        Patient::builder()
            .active(true)
            .identifier(vec![Some(
                Identifier::builder()
                    .system(MRN_SYSTEM.to_owned())
                    .value(mrn.to_owned())
                    .build()
                    .ctx("Identifier builder")?,
            )])
            .name(vec![Some(
                HumanName::builder()
                    .family(family.to_owned())
                    .given(vec![Some("Ada".to_owned())])
                    .build()
                    .ctx("HumanName builder")?,
            )])
            .gender(AdministrativeGender::Female)
            .birth_date(BIRTH_DATE.parse::<Date>().ctx("birth date")?)
            .build()
            .ctx("Patient builder")
    }

    /// A heart rate of 72/min taken on 2024-03-01, about `subject` (any reference string).
    fn heart_rate(subject: String) -> Result<Observation, String> {
        Observation::builder()
            .status(ObservationStatus::Final)
            .code(
                CodeableConcept::builder()
                    .coding(vec![Some(
                        Coding::builder()
                            .system("http://loinc.org".to_owned())
                            .code("8867-4".to_owned())
                            .display("Heart rate".to_owned())
                            .build()
                            .ctx("Coding builder")?,
                    )])
                    .build()
                    .ctx("CodeableConcept builder")?,
            )
            .subject(Reference::builder().reference(subject).build().ctx("Reference builder")?)
            .effective(ObservationEffective::DateTime(
                "2024-03-01T10:15:00+01:00".parse::<DateTime>().ctx("effective")?,
            ))
            .value(ObservationValue::Quantity(
                Quantity::builder()
                    .value(72.0)
                    .unit("/min".to_owned())
                    .system("http://unitsofmeasure.org".to_owned())
                    .code("/min".to_owned())
                    .build()
                    .ctx("Quantity builder")?,
            ))
            .build()
            .ctx("Observation builder")
    }

    /// `ResourceWrite::create` for a Patient and an Observation about it; the SDK takes id and
    /// version from the `Location` header.
    pub async fn create(&self) -> Result<(String, Created), String> {
        let mut patient = Self::patient(&self.family("Crud"), &format!("crud-{}", self.tag))?;
        let patient_id = patient.create(&self.client).await.ctx("create Patient")?;
        let mut observation = Self::heart_rate(format!("Patient/{patient_id}"))?;
        let observation_id = observation.create(&self.client).await.ctx("create Observation")?;
        let versions = (version(patient.meta.as_ref()), version(observation.meta.as_ref()));
        ensure(versions == (Some("1"), Some("1")), || {
            format!("versionIds from Location/ETag are {versions:?}, expected 1 and 1")
        })?;
        let detail = format!("Patient/{patient_id}, Observation/{observation_id}, both version 1");
        Ok((detail, Created { patient, observation }))
    }

    /// Reads both back and compares what was sent, field by field.
    pub async fn read(&self, created: &Created) -> Outcome {
        let sent = &created.patient;
        let id = sent.id.as_deref().ctx("created Patient id")?;
        let got = self.client.read::<Patient>(id).await.ctx("read Patient")?.ctx("Patient")?;
        ensure(got.identifier == sent.identifier, || {
            format!("identifier: sent {:?}, read {:?}", sent.identifier, got.identifier)
        })?;
        ensure(got.name == sent.name, || format!("name: sent {:?}, read {:?}", sent.name, got.name))?;
        ensure(got.gender == sent.gender && got.birth_date == sent.birth_date && got.active == sent.active, || {
            format!(
                "gender/birthDate/active: sent {:?} {:?} {:?}, read {:?} {:?} {:?}",
                sent.gender, sent.birth_date, sent.active, got.gender, got.birth_date, got.active
            )
        })?;

        let sent = &created.observation;
        let id = sent.id.as_deref().ctx("created Observation id")?;
        let got = self.client.read::<Observation>(id).await.ctx("read Observation")?.ctx("Observation")?;
        ensure(got.subject == sent.subject && got.code == sent.code, || {
            format!("subject/code: sent {:?} {:?}, read {:?} {:?}", sent.subject, sent.code, got.subject, got.code)
        })?;
        ensure(got.value == sent.value && got.effective == sent.effective && got.status == sent.status, || {
            format!(
                "value/effective/status: sent {:?} {:?} {}, read {:?} {:?} {}",
                sent.value, sent.effective, sent.status, got.value, got.effective, got.status
            )
        })?;
        Ok("identifier, name, gender, birthDate, active; subject, code, value, effective, status equal".into())
    }

    /// A conditional update (`If-Match` from the version the SDK tracks), then the same update
    /// again from the stale version, which the server must refuse with 412.
    pub async fn update(&self, created: &mut Created) -> Outcome {
        let mut stale = created.patient.clone();
        let patient = &mut created.patient;
        patient.active = Some(false);
        let was_created = patient.update(true, &self.client).await.ctx("update Patient (If-Match: W/\"1\")")?;
        ensure(!was_created, || "update answered 201 Created, expected 200".into())?;
        let v = version(patient.meta.as_ref());
        ensure(v == Some("2"), || format!("versionId after update is {v:?}, expected 2"))?;
        let id = patient.id.as_deref().ctx("Patient id")?;
        let got = self.client.read::<Patient>(id).await.ctx("read after update")?.ctx("Patient")?;
        ensure(got.active == Some(false), || format!("read after update: active {:?}", got.active))?;

        stale.active = Some(true);
        match stale.update(true, &self.client).await {
            Err(fhir_sdk::client::Error::OperationOutcomeR4B(status, _)) if status.as_u16() == 412 => {}
            Err(other) => return Err(format!("stale If-Match: expected 412, got {}", other.describe())),
            Ok(_) => return Err("stale If-Match W/\"1\" was accepted, expected 412".into()),
        }
        Ok("version 2 via If-Match: W/\"1\"; a second update with the stale W/\"1\" is 412".into())
    }

    /// `read_version` of both versions and `history` of the instance.
    pub async fn vread(&self, created: &Created) -> Outcome {
        let id = created.patient.id.as_deref().ctx("Patient id")?;
        let v1 = self.client.read_version::<Patient>(id, "1").await.ctx("vread 1")?.ctx("version 1")?;
        let v2 = self.client.read_version::<Patient>(id, "2").await.ctx("vread 2")?.ctx("version 2")?;
        ensure(v1.active == Some(true) && v2.active == Some(false), || {
            format!("active in v1/v2: {:?}/{:?}, expected true/false", v1.active, v2.active)
        })?;
        // `all_matches` keeps only entries with search.mode = match, which a history Bundle
        // does not have (the spec gives history entries request/response, no search).
        let history: Vec<Resource> = self
            .client
            .history::<Patient>(Some(id))
            .await
            .ctx("history")?
            .all_entries()
            .try_collect()
            .await
            .ctx("history pages")?;
        let mut versions: Vec<Option<&str>> = history
            .iter()
            .map(|r| r.as_base_resource().meta().as_ref().and_then(|m| m.version_id.as_deref()))
            .collect();
        versions.sort_unstable();
        ensure(versions == [Some("1"), Some("2")], || format!("history versions {versions:?}, expected 1 and 2"))?;
        Ok("_history/1 active=true, _history/2 active=false, history has both".into())
    }

    /// Deletes a Patient of its own (the created one is still referenced); a read after it
    /// is `None` (fhir-sdk maps 404 and 410 to `None`).
    pub async fn delete(&self) -> Outcome {
        let mut patient = Self::patient(&self.family("Delete"), &format!("delete-{}", self.tag))?;
        let id = patient.create(&self.client).await.ctx("create Patient")?;
        patient.delete(&self.client).await.ctx("delete Patient")?;
        let after = self.client.read::<Patient>(&id).await.ctx("read after delete")?;
        ensure(after.is_none(), || format!("Patient/{id} still reads after delete"))?;
        Ok(format!("Patient/{id} deleted, read gives None (404/410)"))
    }

    pub async fn search_token(&self, created: &Created) -> Outcome {
        let mrn = format!("crud-{}", self.tag);
        let found: Vec<Patient> = self
            .client
            .search(SearchParameters::empty().and(TokenSearch::Standard {
                name: "identifier",
                system: Some(MRN_SYSTEM),
                code: Some(&mrn),
                not: false,
            }))
            .await
            .ctx("Patient?identifier=")?
            .all_matches()
            .try_collect()
            .await
            .ctx("pages")?;
        let want = created.patient.id.clone();
        ensure(found.len() == 1 && found[0].id == want, || format!("expected only {want:?}, got {:?}", ids(&found)))?;
        Ok(format!("identifier={MRN_SYSTEM}|{mrn} finds exactly the created Patient"))
    }

    pub async fn search_reference(&self, created: &Created) -> Outcome {
        let patient_id = created.patient.id.as_deref().ctx("Patient id")?;
        let found: Vec<Observation> = self
            .client
            .search(SearchParameters::empty().and(ReferenceSearch::Standard {
                name: "subject",
                resource_type: ResourceType::Patient,
                id: patient_id,
                version_id: None,
            }))
            .await
            .ctx("Observation?subject=")?
            .all_matches()
            .try_collect()
            .await
            .ctx("pages")?;
        let want = created.observation.id.clone();
        ensure(found.len() == 1 && found[0].id == want, || format!("expected only {want:?}, got {:?}", ids(&found)))?;
        Ok(format!("subject=Patient/{patient_id} finds exactly the created Observation"))
    }

    pub async fn search_string(&self, created: &Created) -> Outcome {
        let family = self.family("Crud");
        // The default string search is a case-insensitive prefix match: a lowercase prefix
        // must find the same Patient as the exact name.
        let prefix = family[..family.len() - 2].to_lowercase();
        for (value, exact) in [(family.as_str(), true), (prefix.as_str(), false)] {
            let search = if exact {
                StringSearch::Exact { name: "family", value }
            } else {
                StringSearch::Standard { name: "family", value }
            };
            let found: Vec<Patient> = self
                .client
                .search(SearchParameters::empty().and(search))
                .await
                .ctx(format!("Patient?family={value}"))?
                .all_matches()
                .try_collect()
                .await
                .ctx("pages")?;
            ensure(found.len() == 1 && found[0].id == created.patient.id, || {
                format!(
                    "family{}={value}: expected {:?}, got {:?}",
                    if exact { ":exact" } else { "" },
                    created.patient.id,
                    ids(&found)
                )
            })?;
        }
        Ok(format!("family:exact={family} and family={prefix} (prefix, lowercase) find the Patient"))
    }

    pub async fn search_date(&self, created: &Created) -> Outcome {
        let family = self.family("Crud");
        let mut seen = Vec::new();
        for (comparator, value, expect) in [
            (None, BIRTH_DATE, true),
            (Some(SearchComparator::Ge), "1970-01", true),
            (Some(SearchComparator::Gt), BIRTH_DATE, false),
            (Some(SearchComparator::Lt), "1970", false),
        ] {
            let found: Vec<Patient> = self
                .client
                .search(
                    SearchParameters::empty()
                        .and(StringSearch::Exact { name: "family", value: &family })
                        .and(DateSearch { name: "birthdate", comparator, value }),
                )
                .await
                .ctx(format!("birthdate={}{value}", comparator.map(|c| c.to_string()).unwrap_or_default()))?
                .all_matches()
                .try_collect()
                .await
                .ctx("pages")?;
            let hit = found.iter().any(|p| p.id == created.patient.id);
            let query = format!("birthdate={}{value}", comparator.map(|c| c.to_string()).unwrap_or_default());
            ensure(hit == expect && found.len() == usize::from(expect), || {
                format!("{query}: expected {}, got {:?}", if expect { "the Patient" } else { "nothing" }, ids(&found))
            })?;
            seen.push(query);
        }
        // A dateTime parameter on the Observation, too.
        let patient_id = created.patient.id.as_deref().ctx("Patient id")?;
        let found: Vec<Observation> = self
            .client
            .search(
                SearchParameters::empty()
                    .and(ReferenceSearch::Standard {
                        name: "subject",
                        resource_type: ResourceType::Patient,
                        id: patient_id,
                        version_id: None,
                    })
                    .and(DateSearch { name: "date", comparator: Some(SearchComparator::Ge), value: "2024-03-01" })
                    .and(DateSearch { name: "date", comparator: Some(SearchComparator::Lt), value: "2024-03-02" }),
            )
            .await
            .ctx("Observation?date=ge2024-03-01&date=lt2024-03-02")?
            .all_matches()
            .try_collect()
            .await
            .ctx("pages")?;
        ensure(found.len() == 1, || format!("Observation date range: expected 1, got {:?}", ids(&found)))?;
        Ok(format!("{} as expected; Observation date=ge2024-03-01&date=lt2024-03-02 finds it", seen.join(", ")))
    }

    /// Writes `count` Patients in one batch (the client's batch API), then pages through them
    /// `_count=page` at a time, by hand (`next_page`) and with the SDK's `all_matches` stream.
    pub async fn paging(&self, count: usize, page: usize) -> Outcome {
        let family = self.family("Page");
        let mut batch = self.client.batch();
        for i in 0..count {
            // `create` answers the entry's urn:uuid fullUrl; batch entries refer to nothing.
            let _ = batch.create(Self::patient(&family, &format!("page-{}-{i}", self.tag))?);
        }
        let response = batch.send().await.ctx(format!("batch of {count} Patient creates"))?;
        let created = response
            .entry
            .iter()
            .flatten()
            .filter(|e| e.response.as_ref().is_some_and(|r| r.status.starts_with("201")))
            .count();
        ensure(response.r#type == BundleType::BatchResponse && created == count, || {
            format!("batch-response: type {}, {created}/{count} entries 201", response.r#type)
        })?;

        let search = || {
            self.client.search::<Patient>(
                SearchParameters::empty()
                    .and(StringSearch::Exact { name: "family", value: &family })
                    .and_raw("_count", page),
            )
        };
        let first: Page<FhirR4B, Patient> = search().await.ctx("Patient?family:exact=&_count=")?;
        let mut pages = vec![first.matches().count()];
        let mut current = first;
        while let Some(next) = current.next_page().await {
            current = next.ctx(format!("next page {}", pages.len() + 1))?;
            pages.push(current.matches().count());
            ensure(pages.len() <= count + 1, || format!("more than {} pages: {pages:?}", count + 1))?;
        }
        let expected_pages = count.div_ceil(page);
        ensure(pages.len() == expected_pages && pages.iter().sum::<usize>() == count, || {
            format!("pages of sizes {pages:?}, expected {expected_pages} pages, {count} in all")
        })?;

        let all: Vec<Patient> = search().await.ctx("search")?.all_matches().try_collect().await.ctx("all_matches")?;
        let distinct: BTreeSet<_> = all.iter().filter_map(|p| p.id.clone()).collect();
        ensure(all.len() == count && distinct.len() == count, || {
            format!("all_matches gave {} Patients ({} distinct ids), expected {count}", all.len(), distinct.len())
        })?;
        Ok(format!("{count} Patients from one batch; _count={page} gives pages {pages:?}; all_matches streams {count} distinct"))
    }

    /// A transaction built from R4B `BundleEntry` models: a Patient and an Observation whose
    /// subject is the Patient's `urn:uuid:` fullUrl, which the server must rewrite.
    pub async fn transaction(&self) -> Outcome {
        let patient_url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
        let patient = Self::patient(&self.family("Tx"), &format!("tx-{}", self.tag))?;
        let observation = Self::heart_rate(patient_url.clone())?;
        let entry = |full_url: String, resource: Resource, url: &str| {
            BundleEntry::builder()
                .full_url(full_url)
                .resource(resource)
                .request(
                    BundleEntryRequest::builder()
                        .method(HTTPVerb::Post)
                        .url(url.to_owned())
                        .build()
                        .ctx("BundleEntryRequest builder")?,
                )
                .build()
                .ctx("BundleEntry builder")
        };
        let mut tx = self.client.transaction();
        tx.with_raw(entry(patient_url, patient.into(), "Patient")?);
        tx.with_raw(entry(format!("urn:uuid:{}", uuid::Uuid::new_v4()), observation.into(), "Observation")?);
        let response: Bundle = tx.send().await.ctx("POST transaction")?;

        ensure(response.r#type == BundleType::TransactionResponse, || {
            format!("response Bundle type {}, expected transaction-response", response.r#type)
        })?;
        let entries: Vec<&BundleEntry> = response.entry.iter().flatten().collect();
        let statuses: Vec<&str> =
            entries.iter().filter_map(|e| e.response.as_ref()).map(|r| r.status.as_str()).collect();
        ensure(entries.len() == 2 && statuses.iter().all(|s| s.starts_with("201")), || {
            format!("expected 2 entries with status 201, got {statuses:?}")
        })?;
        let location = |i: usize| {
            entries[i].response.as_ref().and_then(|r| r.location.clone()).ctx(format!("entry {i} response.location"))
        };
        let (patient_loc, observation_loc) = (location(0)?, location(1)?);
        let patient_id = id_from_location(&patient_loc, "Patient").ctx(format!("Patient id in {patient_loc}"))?;
        let observation_id =
            id_from_location(&observation_loc, "Observation").ctx(format!("Observation id in {observation_loc}"))?;
        let stored = self
            .client
            .read::<Observation>(&observation_id)
            .await
            .ctx("read the transaction's Observation")?
            .ctx("Observation")?;
        let subject = stored.subject.as_ref().and_then(|r| r.reference.clone());
        let want = format!("Patient/{patient_id}");
        ensure(subject.as_deref() == Some(want.as_str()), || {
            format!("Observation.subject is {subject:?}, expected the rewritten {want}")
        })?;
        Ok(format!("transaction-response, 2 × 201; Observation.subject rewritten to {want}"))
    }
}

fn version(meta: Option<&fhir_sdk::r4b::types::Meta>) -> Option<&str> {
    meta.and_then(|m| m.version_id.as_deref())
}

/// Ids for failure details.
fn ids<R: BaseResource>(found: &[R]) -> Vec<Option<String>> {
    found.iter().map(|r| r.id().clone()).collect()
}

/// The id in a `Location` such as `http://host/Patient/123/_history/1` or `Patient/123`.
fn id_from_location(location: &str, resource_type: &str) -> Option<String> {
    let mut segments = location.split('/').skip_while(|s| *s != resource_type).skip(1);
    segments.next().filter(|id| !id.is_empty()).map(str::to_owned)
}
