package org.fhirledger.conformance;

import static org.fhirledger.conformance.Checks.expect;
import static org.fhirledger.conformance.Checks.expectThrows;
import static org.fhirledger.conformance.Checks.require;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.api.MethodOutcome;
import ca.uhn.fhir.rest.api.SearchTotalModeEnum;
import ca.uhn.fhir.rest.api.SummaryEnum;
import ca.uhn.fhir.rest.client.api.IGenericClient;
import ca.uhn.fhir.rest.client.api.ServerValidationModeEnum;
import ca.uhn.fhir.rest.gclient.IQuery;
import ca.uhn.fhir.rest.param.ParamPrefixEnum;
import ca.uhn.fhir.rest.server.exceptions.BaseServerResponseException;
import ca.uhn.fhir.rest.server.exceptions.InvalidRequestException;
import ca.uhn.fhir.rest.server.exceptions.PreconditionFailedException;
import ca.uhn.fhir.rest.server.exceptions.ResourceGoneException;
import ca.uhn.fhir.rest.server.exceptions.ResourceNotFoundException;
import java.io.IOException;
import java.io.Reader;
import java.math.BigDecimal;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Instant;
import java.time.LocalDate;
import java.time.ZoneOffset;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.Date;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.Set;
import java.util.TreeMap;
import java.util.UUID;
import java.util.stream.Collectors;
import org.hl7.fhir.instance.model.api.IIdType;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.Bundle.BundleEntryComponent;
import org.hl7.fhir.r4.model.Bundle.SearchEntryMode;
import org.hl7.fhir.r4.model.CapabilityStatement;
import org.hl7.fhir.r4.model.CapabilityStatement.CapabilityStatementRestResourceComponent;
import org.hl7.fhir.r4.model.CodeType;
import org.hl7.fhir.r4.model.Encounter;
import org.hl7.fhir.r4.model.Enumerations.AdministrativeGender;
import org.hl7.fhir.r4.model.IdType;
import org.hl7.fhir.r4.model.InstantType;
import org.hl7.fhir.r4.model.Observation;
import org.hl7.fhir.r4.model.Parameters;
import org.hl7.fhir.r4.model.Patient;
import org.hl7.fhir.r4.model.Provenance;
import org.hl7.fhir.r4.model.Resource;
import org.hl7.fhir.r4.model.StringType;

/** The generic-client checks against a server without authorization (FHIR_BASE). */
final class RestChecks {
  static final String IDENTIFIER_SYSTEM = "urn:fhir-ledger:conformance:hapi-client";
  private static final String UCUM = "http://unitsofmeasure.org";
  private static final String SUBSETTED = "SUBSETTED";
  private static final int MAX_PAGES = 500;

  private final Checks checks;
  private final HttpTrace trace;
  private final String base;
  private final Path synthea;
  private final FhirContext ctx;
  private final IGenericClient client;
  /** Unique per run: the server may hold data from earlier runs and other suites. */
  private final String run = UUID.randomUUID().toString().substring(0, 12);
  private final Date started = new Date(System.currentTimeMillis() - 2000);

  private CapabilityStatement capabilities;
  private Bundle sent;
  /** The transaction's resources as sent, with references not rewritten, by their new ids. */
  private final Map<String, Resource> loaded = new LinkedHashMap<>();
  private String patientId;
  private String versionedId;

  RestChecks(Checks checks, HttpTrace trace, FhirContext ctx, String base, Path synthea) {
    this.checks = checks;
    this.trace = trace;
    this.base = base;
    this.synthea = synthea;
    this.ctx = ctx;
    this.client = Main.newClient(ctx, base, trace);
  }

  void runAll() {
    checks.run("capabilities: .capabilities().ofType(CapabilityStatement.class)", this::capabilities);
    checks.run("formats: JSON, and XML only where /metadata claims it", this::formats);
    checks.run("server validation: ServerValidationModeEnum.ONCE accepts the server", this::serverValidation);
    checks.run("transaction: Synthea bundle via .transaction().withBundle()", this::transaction);
    checks.run("read: .read().resource(Patient.class).withId()", this::read);
    checks.run("vread: .read().withIdAndVersion()", this::vread);
    checks.run("read missing id: ResourceNotFoundException (404)", this::readMissing);
    checks.run("read: .read().withUrl(absolute URL)", this::readWithUrl);
    checks.run("create: .create().resource()", this::create);
    checks.run("conditional create: .conditional().where(IDENTIFIER) twice, no duplicate", this::conditionalCreate);
    checks.run("versioned update: If-Match from the resource's version id", this::versionedUpdate);
    checks.run("versioned update: stale version -> PreconditionFailedException (412)", this::staleUpdate);
    checks.run("conditional update: .update().conditional().where(IDENTIFIER)", this::conditionalUpdate);
    checks.run("patch: JSON Patch via .patch().withBody()", this::jsonPatch);
    checks.run("patch: FHIRPath Patch via .patch().withFhirPatch()", this::fhirPathPatch);
    checks.run("history: instance, .history().onInstance()", this::instanceHistory);
    checks.run("history: type, .history().onType(Patient.class).since(Date)", this::typeHistory);
    checks.run("history: system, .history().onServer().since(InstantType, UTC)", this::systemHistory);
    checks.run("delete: .delete().resourceById(), then read -> ResourceGoneException (410)", this::delete);
    checks.run("search: reference + token + date, sorted descending, counted", this::searchCombined);
    checks.run("search: string (family, :exact, :contains)", this::searchString);
    checks.run("search: token (identifier, gender, code without system)", this::searchToken);
    checks.run("search: date (birthdate eq/lt)", this::searchDate);
    checks.run("search: reference (Encounter.subject, Observation.encounter)", this::searchReference);
    checks.run("search: quantity (value-quantity gt with UCUM units)", this::searchQuantity);
    checks.run("paging: .loadPage().next() to the end, total and no duplicates", this::paging);
    checks.run("_include: Observation:patient, search mode include", this::includePatient);
    checks.run("_include: Encounter:subject", this::includeEncounterSubject);
    checks.run("_revinclude: Provenance:target", this::revIncludeProvenance);
    checks.run("_summary=count: .summaryMode(SummaryEnum.COUNT)", this::summaryCount);
    checks.run("_elements: .elementsSubset(\"code\", \"subject\")", this::elements);
  }

  // ---------------------------------------------------------------------------------------
  // Capabilities, formats, server validation

  private String capabilities() {
    capabilities = client.capabilities().ofType(CapabilityStatement.class).execute();
    expect("4.0.1".equals(capabilities.getFhirVersion().toCode()), "fhirVersion %s", capabilities.getFhirVersion());
    expect(capabilities.getRest().size() == 1, "expected one rest entry");
    Set<String> patient = interactions("Patient");
    for (String i : List.of("read", "vread", "update", "delete", "history-instance", "history-type", "create",
        "search-type")) {
      expect(patient.contains(i), "Patient does not claim %s: %s", i, patient);
    }
    CapabilityStatementRestResourceComponent obs = resource("Observation");
    Set<String> params = obs.getSearchParam().stream().map(p -> p.getName()).collect(Collectors.toSet());
    expect(params.containsAll(List.of("patient", "code", "date", "value-quantity", "subject", "encounter")),
        "Observation search params lack some of patient, code, date, value-quantity, subject, encounter: %s", params);
    expect(obs.getSearchInclude().stream().anyMatch(s -> s.getValue().equals("Observation:patient")),
        "Observation does not claim _include=Observation:patient");
    return "fhirVersion 4.0.1, " + capabilities.getRest().get(0).getResource().size() + " resource types, format "
        + formatCodes() + ", patchFormat " + patchFormats();
  }

  private String formats() {
    require(capabilities, "CapabilityStatement");
    // The default HAPI client asks for XML or JSON: the server must pick one it serves.
    Bundle any = client.search().forResource(Patient.class).count(1).returnBundle(Bundle.class).execute();
    HttpTrace.Exchange plain = trace.lastOf("GET");
    String answered = plain.responseHeader("Content-Type");
    expect(any != null && answered != null, "search with HAPI's default Accept: no Content-Type");

    Bundle json = client.search().forResource(Patient.class).count(1).encodedJson().returnBundle(Bundle.class)
        .execute();
    expect(json != null, "_format=json search returned nothing");

    boolean claimsXml = formatCodes().stream().anyMatch(f -> f.contains("xml"));
    boolean servesXml;
    Integer xmlStatus = null;
    try {
      client.capabilities().ofType(CapabilityStatement.class).encodedXml().execute();
      servesXml = true;
    } catch (BaseServerResponseException e) {
      xmlStatus = e.getStatusCode();
      // 406 Not Acceptable is the answer for a response format the server cannot produce.
      expect(xmlStatus == 406, "_format=xml answered HTTP %d, not 406: %s", xmlStatus,
          Checks.describe(e));
      servesXml = false;
    }
    expect(claimsXml == servesXml, "CapabilityStatement.format %s %s XML, but _format=xml %s", formatCodes(),
        claimsXml ? "claims" : "does not claim", servesXml ? "is served" : "answered " + xmlStatus);
    if (servesXml) {
      return "JSON and XML served; HAPI's default Accept is answered with " + answered;
    }
    expect(answered.contains("json"), "HAPI's default Accept (XML or JSON) was answered with %s", answered);
    // HAPI encodes request bodies as XML unless told otherwise: a JSON-only server needs this.
    client.setEncoding(EncodingEnum.JSON);
    return "server does not serve XML (_format=xml -> HTTP " + xmlStatus + ", format " + formatCodes()
        + "); NOTE: HAPI clients here use client.setEncoding(EncodingEnum.JSON); HAPI's default Accept \""
        + plain.header("Accept") + "\" is answered with " + answered;
  }

  private String serverValidation() {
    // A fresh context: the factory validates each base URL once, and only on first use.
    FhirContext fresh = FhirContext.forR4();
    fresh.getRestfulClientFactory().setServerValidationMode(ServerValidationModeEnum.ONCE);
    HttpTrace own = new HttpTrace();
    IGenericClient validating = Main.newClient(fresh, base, own);
    validating.setEncoding(client.getEncoding());
    validating.search().forResource(Patient.class).count(1).returnBundle(Bundle.class).execute();
    List<HttpTrace.Exchange> sent = own.exchanges();
    expect(sent.size() == 2 && sent.get(0).uri().contains("/metadata"),
        "expected GET /metadata, then the search; HAPI sent %s", sent);
    return "HAPI fetched " + sent.get(0) + " and then ran the search";
  }

  // ---------------------------------------------------------------------------------------
  // Transaction, read, create, update, patch, history, delete

  private String transaction() throws IOException {
    try (Reader in = Files.newBufferedReader(synthea, StandardCharsets.UTF_8)) {
      sent = ctx.newJsonParser().parseResource(Bundle.class, in);
    }
    List<String> fullUrls = sent.getEntry().stream().map(BundleEntryComponent::getFullUrl).toList();
    List<Resource> resources = sent.getEntry().stream().map(BundleEntryComponent::getResource).toList();
    Bundle response = client.transaction().withBundle(sent).execute();

    expect(response.getType() == Bundle.BundleType.TRANSACTIONRESPONSE, "type %s", response.getType());
    expect(response.getEntry().size() == fullUrls.size(), "%d entries sent, %d answered", fullUrls.size(),
        response.getEntry().size());
    for (int i = 0; i < fullUrls.size(); i++) {
      Bundle.BundleEntryResponseComponent r = response.getEntry().get(i).getResponse();
      expect(r.getStatus() != null && r.getStatus().startsWith("201"), "entry %d (%s): status %s", i,
          fullUrls.get(i), r.getStatus());
      IdType location = new IdType(Objects.requireNonNullElse(r.getLocation(), ""));
      String type = resources.get(i).fhirType();
      expect(type.equals(location.getResourceType()) && location.hasIdPart() && location.hasVersionIdPart(),
          "entry %d (%s): location %s is not %s/<id>/_history/<vid>", i, fullUrls.get(i), r.getLocation(), type);
      loaded.put(type + "/" + location.getIdPart(), resources.get(i));
      if (type.equals("Patient")) {
        patientId = location.getIdPart();
      }
    }
    require(patientId, "the bundle's Patient");
    return fullUrls.size() + " entries, all 201 with Type/id/_history/vid locations; Patient/" + patientId;
  }

  private String read() {
    Patient sentPatient = (Patient) require(loaded.get("Patient/" + require(patientId, "Patient id")), "Patient");
    Patient p = client.read().resource(Patient.class).withId(patientId).execute();
    expect(patientId.equals(p.getIdElement().getIdPart()), "id %s", p.getIdElement());
    expect(p.getIdElement().hasVersionIdPart(), "read gave no version id (meta.versionId / ETag)");
    expect(p.getNameFirstRep().getFamily().equals(sentPatient.getNameFirstRep().getFamily()), "family %s",
        p.getNameFirstRep().getFamily());
    expect(p.getBirthDateElement().getValueAsString().equals(sentPatient.getBirthDateElement().getValueAsString()),
        "birthDate %s", p.getBirthDateElement().getValueAsString());
    return p.getIdElement().getValue();
  }

  private String vread() {
    Patient p = client.read().resource(Patient.class).withIdAndVersion(require(patientId, "Patient id"), "1")
        .execute();
    expect("1".equals(p.getIdElement().getVersionIdPart()), "version %s", p.getIdElement().getVersionIdPart());
    expect("1".equals(p.getMeta().getVersionId()), "meta.versionId %s", p.getMeta().getVersionId());
    return p.getIdElement().getValue();
  }

  private String readMissing() {
    String id = "hapi-missing-" + run;
    ResourceNotFoundException e = expectThrows(ResourceNotFoundException.class, "read Patient/" + id,
        () -> client.read().resource(Patient.class).withId(id).execute());
    return "Patient/" + id + " -> HTTP " + e.getStatusCode();
  }

  private String readWithUrl() {
    String url = base + "/Patient/" + require(patientId, "Patient id");
    Patient p = client.read().resource(Patient.class).withUrl(url).execute();
    expect(patientId.equals(p.getIdElement().getIdPart()), "id %s", p.getIdElement());
    return url;
  }

  private Patient newPatient(String label) {
    Patient p = new Patient();
    p.addIdentifier().setSystem(IDENTIFIER_SYSTEM).setValue(label + "-" + run);
    p.addName().setFamily("Hapi" + label.replace("-", "")).addGiven("Conformance");
    p.setGender(AdministrativeGender.UNKNOWN);
    return p;
  }

  private String create() {
    MethodOutcome out = client.create().resource(newPatient("create")).execute();
    expect(Boolean.TRUE.equals(out.getCreated()), "created flag %s (status 201 expected)", out.getCreated());
    IIdType id = out.getId();
    expect(id != null && "Patient".equals(id.getResourceType()) && id.hasIdPart(), "Location id %s", id);
    expect("1".equals(id.getVersionIdPart()), "new resource version %s, expected 1", id.getVersionIdPart());
    Patient back = client.read().resource(Patient.class).withId(id.getIdPart()).execute();
    expect(("create-" + run).equals(back.getIdentifierFirstRep().getValue()), "read back %s",
        back.getIdentifierFirstRep().getValue());
    return id.getValue();
  }

  private String conditionalCreate() {
    String value = "conditional-create-" + run;
    Patient p = newPatient("conditional-create");
    MethodOutcome first = client.create().resource(p).conditional()
        .where(Patient.IDENTIFIER.exactly().systemAndIdentifier(IDENTIFIER_SYSTEM, value)).execute();
    MethodOutcome second = client.create().resource(newPatient("conditional-create")).conditional()
        .where(Patient.IDENTIFIER.exactly().systemAndIdentifier(IDENTIFIER_SYSTEM, value)).execute();
    expect(Boolean.TRUE.equals(first.getCreated()), "first: created %s, expected 201", first.getCreated());
    expect(!Boolean.TRUE.equals(second.getCreated()), "second: created again (201), expected 200");
    expect(first.getId().getIdPart().equals(second.getId().getIdPart()), "second names %s, first %s",
        second.getId(), first.getId());
    Bundle found = client.search().forResource(Patient.class)
        .where(Patient.IDENTIFIER.exactly().systemAndIdentifier(IDENTIFIER_SYSTEM, value))
        .returnBundle(Bundle.class).execute();
    expect(found.getEntry().size() == 1, "%d patients with identifier %s", found.getEntry().size(), value);
    return "first 201 " + first.getId().toUnqualifiedVersionless() + ", second 200 with the same id, 1 match";
  }

  private String versionedUpdate() {
    MethodOutcome created = client.create().resource(newPatient("versioned")).execute();
    versionedId = created.getId().getIdPart();
    Patient v1 = client.read().resource(Patient.class).withId(versionedId).execute();
    expect("1".equals(v1.getIdElement().getVersionIdPart()), "read version %s", v1.getIdElement());
    v1.setGender(AdministrativeGender.MALE);
    // The resource's id carries version 1, so HAPI sends If-Match: W/"1" by itself.
    MethodOutcome updated = client.update().resource(v1).execute();
    String ifMatch = trace.lastOf("PUT").header("If-Match");
    expect("W/\"1\"".equals(ifMatch), "HAPI sent If-Match %s", ifMatch);
    expect("2".equals(updated.getId().getVersionIdPart()), "new version %s", updated.getId());
    Patient v2 = client.read().resource(Patient.class).withId(versionedId).execute();
    expect(v2.getGender() == AdministrativeGender.MALE, "gender %s", v2.getGender());
    return "If-Match " + ifMatch + " -> " + updated.getId().toUnqualified().getValue();
  }

  private String staleUpdate() {
    Patient stale = client.read().resource(Patient.class).withIdAndVersion(require(versionedId, "versioned"), "1")
        .execute();
    stale.setGender(AdministrativeGender.FEMALE);
    // FHIR (http.html#concurrency): a version mismatch on If-Match is 412, not 409.
    PreconditionFailedException e = expectThrows(PreconditionFailedException.class, "update with If-Match W/\"1\"",
        () -> client.update().resource(stale).execute());
    String ifMatch = trace.lastOf("PUT").header("If-Match");
    expect("W/\"1\"".equals(ifMatch), "HAPI sent If-Match %s", ifMatch);
    Patient current = client.read().resource(Patient.class).withId(versionedId).execute();
    expect("2".equals(current.getIdElement().getVersionIdPart()) && current.getGender() == AdministrativeGender.MALE,
        "stale update changed the resource: %s %s", current.getIdElement(), current.getGender());
    return "If-Match " + ifMatch + " on version 2 -> HTTP " + e.getStatusCode() + ", resource unchanged";
  }

  private String conditionalUpdate() {
    String value = "conditional-update-" + run;
    Patient p = newPatient("conditional-update");
    MethodOutcome first = client.update().resource(p).conditional()
        .where(Patient.IDENTIFIER.exactly().systemAndIdentifier(IDENTIFIER_SYSTEM, value)).execute();
    expect(Boolean.TRUE.equals(first.getCreated()), "no match: created %s, expected 201", first.getCreated());
    Patient again = newPatient("conditional-update");
    again.setGender(AdministrativeGender.FEMALE);
    MethodOutcome second = client.update().resource(again).conditional()
        .where(Patient.IDENTIFIER.exactly().systemAndIdentifier(IDENTIFIER_SYSTEM, value)).execute();
    expect(!Boolean.TRUE.equals(second.getCreated()), "one match: created a second resource (201)");
    expect(first.getId().getIdPart().equals(second.getId().getIdPart()), "updated %s, not %s", second.getId(),
        first.getId());
    Patient back = client.read().resource(Patient.class).withId(first.getId().getIdPart()).execute();
    expect(back.getGender() == AdministrativeGender.FEMALE && "2".equals(back.getIdElement().getVersionIdPart()),
        "after update: %s gender %s", back.getIdElement(), back.getGender());
    return "no match -> 201 " + first.getId().toUnqualifiedVersionless() + "; one match -> 200, version 2";
  }

  private String jsonPatch() {
    require(capabilities, "CapabilityStatement");
    if (!patchFormats().contains("application/json-patch+json")) {
      throw new Checks.Skipped("JSON Patch not claimed by server (patchFormat " + patchFormats() + ")");
    }
    String id = require(versionedId, "versioned Patient");
    String body = "[{\"op\":\"replace\",\"path\":\"/gender\",\"value\":\"other\"},"
        + "{\"op\":\"add\",\"path\":\"/birthDate\",\"value\":\"1990-02-03\"}]";
    client.patch().withBody(body).withId(new IdType("Patient", id)).execute();
    String contentType = trace.lastOf("PATCH").header("Content-Type");
    Patient back = client.read().resource(Patient.class).withId(id).execute();
    expect(back.getGender() == AdministrativeGender.OTHER, "gender %s", back.getGender());
    expect("1990-02-03".equals(back.getBirthDateElement().getValueAsString()), "birthDate %s",
        back.getBirthDateElement().getValueAsString());
    expect("3".equals(back.getIdElement().getVersionIdPart()), "version %s", back.getIdElement());
    return "Content-Type " + contentType + " -> " + back.getIdElement().toUnqualified().getValue();
  }

  private String fhirPathPatch() {
    require(capabilities, "CapabilityStatement");
    // FHIRPath Patch is a Parameters resource, so a server claims it as a FHIR mime type.
    if (patchFormats().stream().noneMatch(f -> f.startsWith("application/fhir+"))) {
      throw new Checks.Skipped("FHIRPath Patch not claimed by server (patchFormat " + patchFormats() + ")");
    }
    Parameters patch = new Parameters();
    var op = patch.addParameter().setName("operation");
    op.addPart().setName("type").setValue(new CodeType("replace"));
    op.addPart().setName("path").setValue(new StringType("Patient.gender"));
    op.addPart().setName("value").setValue(new CodeType("female"));
    MethodOutcome created = client.create().resource(newPatient("fhirpath-patch")).execute();
    client.patch().withFhirPatch(patch).withId(created.getId().toUnqualifiedVersionless()).execute();
    Patient back = client.read().resource(Patient.class).withId(created.getId().getIdPart()).execute();
    expect(back.getGender() == AdministrativeGender.FEMALE, "gender %s", back.getGender());
    return back.getIdElement().toUnqualified().getValue();
  }

  private String instanceHistory() {
    String id = require(versionedId, "versioned Patient");
    Bundle h = client.history().onInstance(new IdType("Patient", id)).returnBundle(Bundle.class).execute();
    expect(h.getType() == Bundle.BundleType.HISTORY, "type %s", h.getType());
    List<String> versions = h.getEntry().stream().map(e -> e.getResource().getIdElement().getVersionIdPart())
        .toList();
    expect(versions.equals(List.of("3", "2", "1")), "versions newest first should be [3, 2, 1], got %s", versions);
    List<Bundle.HTTPVerb> methods = h.getEntry().stream().map(e -> e.getRequest().getMethod()).toList();
    // Created by POST, updated by PUT, then patched (recorded as PATCH, or as the PUT it amounts to).
    expect(methods.get(2) == Bundle.HTTPVerb.POST && methods.get(1) == Bundle.HTTPVerb.PUT
        && (methods.get(0) == Bundle.HTTPVerb.PATCH || methods.get(0) == Bundle.HTTPVerb.PUT),
        "entry.request.method newest first: %s", methods);
    return "Patient/" + id + " versions " + versions + ", methods " + methods;
  }

  private String typeHistory() {
    String id = require(versionedId, "versioned Patient");
    Bundle first;
    try {
      first = client.history().onType(Patient.class).returnBundle(Bundle.class).since(started).count(100).execute();
    } catch (InvalidRequestException e) {
      String url = trace.lastOf("GET").uri();
      // HAPI's client writes _since's offset unescaped ("+00:00"); form decoding makes it a space.
      throw new AssertionError(url.contains("+") ? "HAPI sent the _since offset's '+' unescaped (" + url
          + "), the server read it as a space and refused: " + Checks.describe(e)
          + " (HAPI's own server reads a space there as '+')" : Checks.describe(e), e);
    }
    List<String> ours = historyVersionsOf(first, "Patient/" + id);
    expect(ours.equals(List.of("3", "2", "1")), "Patient/%s versions in type history: %s", id, ours);
    return "Patient/" + id + " versions " + ours + " among Patient history since the run started";
  }

  private String systemHistory() {
    String id = require(versionedId, "versioned Patient");
    // A UTC instant ("Z") has no '+' for HAPI to leave unescaped (see typeHistory), so this
    // checks the system history itself.
    InstantType since = new InstantType(started);
    since.setTimeZoneZulu(true);
    Bundle first = client.history().onServer().returnBundle(Bundle.class).since(since).count(100).execute();
    List<String> ours = historyVersionsOf(first, "Patient/" + id);
    expect(ours.equals(List.of("3", "2", "1")), "Patient/%s versions in system history: %s", id, ours);
    String obs = loaded.keySet().stream().filter(k -> k.startsWith("Observation/")).findFirst().orElseThrow();
    expect(!historyVersionsOf(first, obs).isEmpty(), "system history since the run started lacks %s", obs);
    return "Patient/" + id + " versions " + ours + " and the transaction's " + obs;
  }

  /** Follows next links and returns the version ids of one resource in page order. */
  private List<String> historyVersionsOf(Bundle page, String typeAndId) {
    List<String> versions = new ArrayList<>();
    for (Bundle p : pages(page)) {
      for (BundleEntryComponent e : p.getEntry()) {
        if (e.hasResource() && e.getResource().getIdElement().toUnqualifiedVersionless().getValue().equals(typeAndId)) {
          versions.add(e.getResource().getIdElement().getVersionIdPart());
        }
      }
    }
    return versions;
  }

  private String delete() {
    IIdType id = client.create().resource(newPatient("delete")).execute().getId().toUnqualifiedVersionless();
    client.delete().resourceById(id).execute();
    ResourceGoneException gone = expectThrows(ResourceGoneException.class, "read after delete",
        () -> client.read().resource(Patient.class).withId(id.getIdPart()).execute());
    Bundle h = client.history().onInstance(id).returnBundle(Bundle.class).execute();
    expect(h.getEntry().size() == 2 && h.getEntry().get(0).getRequest().getMethod() == Bundle.HTTPVerb.DELETE
        && !h.getEntry().get(0).hasResource(), "history after delete: %s",
        h.getEntry().stream().map(e -> e.getRequest().getMethod() + " " + e.getRequest().getUrl()).toList());
    return id.getValue() + " read -> HTTP " + gone.getStatusCode() + "; history ends with the DELETE";
  }

  // ---------------------------------------------------------------------------------------
  // Search

  private List<Observation> sentObservations() {
    require(patientId, "the transaction's Patient");
    return loaded.entrySet().stream().filter(e -> e.getValue() instanceof Observation)
        .map(e -> (Observation) e.getValue()).toList();
  }

  private static String newId(Map<String, Resource> loaded, Resource r) {
    return loaded.entrySet().stream().filter(e -> e.getValue() == r).map(Map.Entry::getKey).findFirst()
        .orElseThrow();
  }

  private static Instant effective(Observation o) {
    return o.getEffectiveDateTimeType().getValue().toInstant();
  }

  private String searchCombined() {
    List<Observation> obs = sentObservations();
    // The patient's commonest LOINC code, and a day between two of its dates (so time zones
    // cannot move an observation across the boundary).
    Map<String, List<Observation>> byCode = obs.stream().filter(Observation::hasEffectiveDateTimeType)
        .collect(Collectors.groupingBy(o -> o.getCode().getCodingFirstRep().getCode(), TreeMap::new,
            Collectors.toList()));
    var code = byCode.entrySet().stream().max(Comparator.comparingInt(e -> e.getValue().size())).orElseThrow();
    String system = code.getValue().get(0).getCode().getCodingFirstRep().getSystem();
    List<Instant> dates = code.getValue().stream().map(RestChecks::effective).sorted().distinct().toList();
    LocalDate from = null;
    for (int i = dates.size() / 2; i + 1 < dates.size() && from == null; i++) {
      LocalDate a = dates.get(i).atOffset(ZoneOffset.UTC).toLocalDate();
      LocalDate b = dates.get(i + 1).atOffset(ZoneOffset.UTC).toLocalDate();
      if (b.isAfter(a.plusDays(3))) {
        from = a.plusDays(2);
      }
    }
    require(from, "a gap of 3 days between observation dates");
    Instant cut = from.atStartOfDay(ZoneOffset.UTC).toInstant();
    Set<String> expected = code.getValue().stream().filter(o -> !effective(o).isBefore(cut))
        .map(o -> newId(loaded, o)).collect(Collectors.toSet());

    Bundle page = client.search().forResource(Observation.class)
        .where(Observation.PATIENT.hasId(patientId))
        .and(Observation.CODE.exactly().systemAndCode(system, code.getKey()))
        .and(Observation.DATE.afterOrEquals().day(from.toString()))
        .sort().descending(Observation.DATE)
        .count(5)
        .totalMode(SearchTotalModeEnum.ACCURATE)
        .returnBundle(Bundle.class)
        .execute();
    expect(page.getTotal() == expected.size(), "total %d, expected %d", page.getTotal(), expected.size());
    expect(page.getEntry().size() == Math.min(5, expected.size()), "page of %d, _count=5",
        page.getEntry().size());
    List<Observation> all = new ArrayList<>();
    for (Bundle p : pages(page)) {
      p.getEntry().forEach(e -> all.add((Observation) e.getResource()));
    }
    Set<String> got = all.stream().map(o -> o.getIdElement().toUnqualifiedVersionless().getValue())
        .collect(Collectors.toSet());
    expect(got.equals(expected), "matched %d %s, expected %d %s", got.size(), got, expected.size(), expected);
    for (int i = 1; i < all.size(); i++) {
      expect(!effective(all.get(i)).isAfter(effective(all.get(i - 1))), "not sorted by date descending at %d: %s then %s",
          i, all.get(i - 1).getEffectiveDateTimeType().getValueAsString(),
          all.get(i).getEffectiveDateTimeType().getValueAsString());
    }
    return "patient + code " + system + "|" + code.getKey() + " + date=ge" + from + " -> total " + page.getTotal()
        + ", pages of 5, newest first";
  }

  private String searchString() {
    Patient p = (Patient) loaded.get("Patient/" + require(patientId, "Patient id"));
    String family = p.getNameFirstRep().getFamily();
    int matches = count(client.search().forResource(Patient.class)
        .where(Patient.FAMILY.matches().value(family.substring(0, 3).toLowerCase()))
        .and(Patient.RES_ID.exactly().code(patientId)));
    expect(matches == 1, "family=%s (prefix, any case): %d", family.substring(0, 3).toLowerCase(), matches);
    int exact = count(client.search().forResource(Patient.class)
        .where(Patient.FAMILY.matchesExactly().value(family))
        .and(Patient.RES_ID.exactly().code(patientId)));
    expect(exact == 1, "family:exact=%s: %d", family, exact);
    int exactWrongCase = count(client.search().forResource(Patient.class)
        .where(Patient.FAMILY.matchesExactly().value(family.toLowerCase()))
        .and(Patient.RES_ID.exactly().code(patientId)));
    expect(exactWrongCase == 0, "family:exact=%s (wrong case) matched %d", family.toLowerCase(), exactWrongCase);
    String middle = family.substring(1, family.length() - 1);
    int contains = count(client.search().forResource(Patient.class)
        .where(Patient.FAMILY.contains().value(middle))
        .and(Patient.RES_ID.exactly().code(patientId)));
    expect(contains == 1, "family:contains=%s: %d", middle, contains);
    return "family prefix, :exact (case-sensitive), :contains \"" + middle + "\"";
  }

  private String searchToken() {
    Patient p = (Patient) loaded.get("Patient/" + require(patientId, "Patient id"));
    var ident = p.getIdentifier().stream().filter(i -> i.hasSystem() && i.hasValue()).findFirst().orElseThrow();
    Set<String> byIdent = ids(client.search().forResource(Patient.class)
        .where(Patient.IDENTIFIER.exactly().systemAndIdentifier(ident.getSystem(), ident.getValue())));
    expect(byIdent.contains("Patient/" + patientId), "identifier=%s|%s did not find Patient/%s (got %s)",
        ident.getSystem(), ident.getValue(), patientId, byIdent);
    String gender = p.getGender().toCode();
    String other = gender.equals("female") ? "male" : "female";
    expect(count(client.search().forResource(Patient.class).where(Patient.GENDER.exactly().code(gender))
        .and(Patient.RES_ID.exactly().code(patientId))) == 1, "gender=%s did not match", gender);
    expect(count(client.search().forResource(Patient.class).where(Patient.GENDER.exactly().code(other))
        .and(Patient.RES_ID.exactly().code(patientId))) == 0, "gender=%s matched", other);
    Observation any = sentObservations().get(0);
    String code = any.getCode().getCodingFirstRep().getCode();
    long expected = sentObservations().stream()
        .filter(o -> o.getCode().getCoding().stream().anyMatch(c -> code.equals(c.getCode()))).count();
    int got = total(client.search().forResource(Observation.class).where(Observation.PATIENT.hasId(patientId))
        .and(Observation.CODE.exactly().code(code)));
    expect(got == expected, "code=%s: total %d, expected %d", code, got, expected);
    return "identifier system|value, gender, code=" + code + " (" + got + ")";
  }

  private String searchDate() {
    Patient p = (Patient) loaded.get("Patient/" + require(patientId, "Patient id"));
    String birth = p.getBirthDateElement().getValueAsString();
    expect(count(client.search().forResource(Patient.class).where(Patient.BIRTHDATE.exactly().day(birth))
        .and(Patient.RES_ID.exactly().code(patientId))) == 1, "birthdate=%s did not match", birth);
    expect(count(client.search().forResource(Patient.class).where(Patient.BIRTHDATE.before().day(birth))
        .and(Patient.RES_ID.exactly().code(patientId))) == 0, "birthdate=lt%s matched", birth);
    String dayAfter = LocalDate.parse(birth).plusDays(1).toString();
    expect(count(client.search().forResource(Patient.class).where(Patient.BIRTHDATE.before().day(dayAfter))
        .and(Patient.RES_ID.exactly().code(patientId))) == 1, "birthdate=lt%s did not match", dayAfter);
    return "birthdate=" + birth + ", lt" + birth + " (none), lt" + dayAfter;
  }

  private String searchReference() {
    require(patientId, "Patient id");
    List<String> encounters = loaded.keySet().stream().filter(k -> k.startsWith("Encounter/")).toList();
    int got = total(client.search().forResource(Encounter.class)
        .where(Encounter.SUBJECT.hasId("Patient/" + patientId)));
    expect(got == encounters.size(), "Encounter?subject=Patient/%s: %d, expected %d", patientId, got,
        encounters.size());
    // Observations of one encounter: the sent references are urn:uuids, so map them.
    Map<String, String> byFullUrl = new HashMap<>();
    for (BundleEntryComponent e : sent.getEntry()) {
      byFullUrl.put(e.getFullUrl(), newId(loaded, e.getResource()));
    }
    Map<String, Long> perEncounter = sentObservations().stream().filter(Observation::hasEncounter)
        .collect(Collectors.groupingBy(o -> byFullUrl.getOrDefault(o.getEncounter().getReference(),
            o.getEncounter().getReference()), Collectors.counting()));
    var busiest = perEncounter.entrySet().stream().max(Map.Entry.comparingByValue()).orElseThrow();
    Set<String> obs = ids(client.search().forResource(Observation.class)
        .where(Observation.ENCOUNTER.hasId(busiest.getKey())));
    expect(obs.size() == busiest.getValue(), "Observation?encounter=%s: %d, expected %d", busiest.getKey(),
        obs.size(), busiest.getValue());
    return "Encounter?subject (" + got + "), Observation?encounter=" + busiest.getKey() + " (" + obs.size() + ")";
  }

  private String searchQuantity() {
    List<Observation> withKg = sentObservations().stream()
        .filter(o -> o.hasValueQuantity() && "kg".equals(o.getValueQuantity().getCode())).toList();
    expect(withKg.size() > 1, "the bundle has no kg observations to search");
    List<BigDecimal> values = withKg.stream().map(o -> o.getValueQuantity().getValue()).distinct().sorted().toList();
    // Halfway between two stored values, with more digits than either: no precision edge.
    BigDecimal cut = values.get(values.size() / 2 - 1).add(values.get(values.size() / 2))
        .divide(BigDecimal.valueOf(2)).setScale(3);
    Set<String> expected = withKg.stream().filter(o -> o.getValueQuantity().getValue().compareTo(cut) > 0)
        .map(o -> newId(loaded, o)).collect(Collectors.toSet());
    Set<String> got = ids(client.search().forResource(Observation.class)
        .where(Observation.PATIENT.hasId(patientId))
        .and(Observation.VALUE_QUANTITY.withPrefix(ParamPrefixEnum.GREATERTHAN).number(cut.toPlainString())
            .andUnits(UCUM, "kg")));
    expect(got.equals(expected), "value-quantity=gt%s|%s|kg: %d matches, expected %d", cut, UCUM, got.size(),
        expected.size());
    return "value-quantity=gt" + cut + "|" + UCUM + "|kg -> " + got.size();
  }

  private String paging() {
    Set<String> expected = sentObservations().stream().map(o -> newId(loaded, o)).collect(Collectors.toSet());
    Bundle first = client.search().forResource(Observation.class).where(Observation.PATIENT.hasId(patientId))
        .count(40).totalMode(SearchTotalModeEnum.ACCURATE).returnBundle(Bundle.class).execute();
    expect(first.getTotal() == expected.size(), "total %d, expected %d", first.getTotal(), expected.size());
    List<Bundle> pages = pages(first);
    List<String> seen = new ArrayList<>();
    for (Bundle p : pages) {
      expect(p.getEntry().size() <= 40, "a page of %d entries with _count=40", p.getEntry().size());
      p.getEntry().forEach(e -> seen.add(e.getResource().getIdElement().toUnqualifiedVersionless().getValue()));
    }
    Set<String> unique = new HashSet<>(seen);
    expect(unique.size() == seen.size(), "%d duplicates across pages", seen.size() - unique.size());
    expect(unique.equals(expected), "paged through %d, expected %d", unique.size(), expected.size());
    expect(pages.size() == (expected.size() + 39) / 40, "%d pages for %d results", pages.size(), expected.size());
    return pages.size() + " pages of <=40, " + seen.size() + " distinct = total " + first.getTotal();
  }

  /** The first page and every page after it, via client.loadPage().next(). */
  private List<Bundle> pages(Bundle first) {
    List<Bundle> out = new ArrayList<>(List.of(first));
    Bundle page = first;
    while (page.getLink(Bundle.LINK_NEXT) != null) {
      expect(out.size() < MAX_PAGES, "more than %d pages", MAX_PAGES);
      page = client.loadPage().next(page).execute();
      out.add(page);
    }
    return out;
  }

  private String includePatient() {
    Bundle b = client.search().forResource(Observation.class).where(Observation.PATIENT.hasId(patientId))
        .include(Observation.INCLUDE_PATIENT).count(5).returnBundle(Bundle.class).execute();
    return checkIncluded(b, "Observation", "Patient/" + patientId);
  }

  private String includeEncounterSubject() {
    Bundle b = client.search().forResource(Encounter.class).where(Encounter.SUBJECT.hasId("Patient/" + patientId))
        .include(Encounter.INCLUDE_SUBJECT).count(5).returnBundle(Bundle.class).execute();
    return checkIncluded(b, "Encounter", "Patient/" + patientId);
  }

  private String revIncludeProvenance() {
    String provenance = loaded.keySet().stream().filter(k -> k.startsWith("Provenance/")).findFirst()
        .orElseThrow(() -> new AssertionError("the bundle has no Provenance"));
    Bundle b = client.search().forResource(Patient.class).where(Patient.RES_ID.exactly().code(patientId))
        .revInclude(Provenance.INCLUDE_TARGET).returnBundle(Bundle.class).execute();
    return checkIncluded(b, "Patient", provenance);
  }

  private static String checkIncluded(Bundle b, String matchType, String included) {
    Map<SearchEntryMode, List<String>> byMode = b.getEntry().stream().collect(Collectors.groupingBy(
        e -> e.getSearch().getMode() == null ? SearchEntryMode.NULL : e.getSearch().getMode(),
        Collectors.mapping(e -> e.getResource().getIdElement().toUnqualifiedVersionless().getValue(),
            Collectors.toList())));
    List<String> matches = byMode.getOrDefault(SearchEntryMode.MATCH, List.of());
    List<String> includes = byMode.getOrDefault(SearchEntryMode.INCLUDE, List.of());
    expect(!matches.isEmpty() && matches.stream().allMatch(m -> m.startsWith(matchType + "/")),
        "search.mode=match entries %s", matches);
    expect(includes.contains(included), "%s not among search.mode=include entries %s (modes %s)", included,
        includes, byMode.keySet());
    expect(includes.stream().distinct().count() == includes.size(), "an included resource is repeated: %s",
        includes);
    expect(byMode.keySet().stream().allMatch(m -> m == SearchEntryMode.MATCH || m == SearchEntryMode.INCLUDE),
        "entries without search.mode match/include: %s", byMode.keySet());
    return matches.size() + " matches, " + included + " with search.mode=include";
  }

  private String summaryCount() {
    int expected = sentObservations().size();
    Bundle b = client.search().forResource(Observation.class).where(Observation.PATIENT.hasId(patientId))
        .summaryMode(SummaryEnum.COUNT).returnBundle(Bundle.class).execute();
    expect(b.hasTotal() && b.getTotal() == expected, "total %s, expected %d", b.hasTotal() ? b.getTotal() : "absent",
        expected);
    expect(b.getEntry().isEmpty(), "%d entries with _summary=count", b.getEntry().size());
    return "total " + b.getTotal() + ", no entries";
  }

  private String elements() {
    Bundle b = client.search().forResource(Observation.class).where(Observation.PATIENT.hasId(patientId))
        .and(Observation.VALUE_QUANTITY.greaterThan().number(0).andNoUnits()).elementsSubset("code", "subject").count(5)
        .returnBundle(Bundle.class).execute();
    expect(!b.getEntry().isEmpty(), "no observations");
    boolean tagged = true;
    for (BundleEntryComponent e : b.getEntry()) {
      Observation o = (Observation) e.getResource();
      expect(o.hasCode() && o.hasSubject(), "%s lacks code or subject", o.getIdElement());
      expect(!o.hasValue() && !o.hasEffective() && !o.hasCategory(), "%s has elements not asked for: %s",
          o.getIdElement(), ctx.newJsonParser().encodeResourceToString(o));
      tagged &= o.getMeta().getTag().stream().anyMatch(t -> SUBSETTED.equals(t.getCode()));
    }
    // SHOULD in the spec (search.html#elements): noted, not failed.
    return b.getEntry().size() + " observations with code and subject only"
        + (tagged ? ", tagged SUBSETTED" : "; NOTE: not tagged SUBSETTED (a SHOULD)");
  }

  /** The encoding the checks settled on (null: HAPI's default, XML bodies). */
  EncodingEnum encoding() {
    return client.getEncoding();
  }

  // ---------------------------------------------------------------------------------------

  private int count(IQuery<?> query) {
    return ids(query).size();
  }

  private int total(IQuery<?> query) {
    Bundle b = query.summaryMode(SummaryEnum.COUNT).returnBundle(Bundle.class).execute();
    expect(b.hasTotal(), "_summary=count without a total");
    return b.getTotal();
  }

  /** Ids of every match, across pages. */
  private Set<String> ids(IQuery<?> query) {
    Set<String> out = new HashSet<>();
    for (Bundle p : pages(query.count(100).returnBundle(Bundle.class).execute())) {
      p.getEntry().stream().filter(e -> e.getSearch().getMode() != SearchEntryMode.INCLUDE)
          .forEach(e -> out.add(e.getResource().getIdElement().toUnqualifiedVersionless().getValue()));
    }
    return out;
  }

  private CapabilityStatementRestResourceComponent resource(String type) {
    return capabilities.getRest().get(0).getResource().stream().filter(r -> type.equals(r.getType())).findFirst()
        .orElseThrow(() -> new AssertionError("CapabilityStatement lists no " + type));
  }

  private Set<String> interactions(String type) {
    return resource(type).getInteraction().stream().map(i -> i.getCode().toCode()).collect(Collectors.toSet());
  }

  private List<String> formatCodes() {
    return capabilities.getFormat().stream().map(CodeType::getValue).toList();
  }

  private List<String> patchFormats() {
    return capabilities.getPatchFormat().stream().map(CodeType::getValue).toList();
  }
}
