package org.fhirledger.conformance;

import static org.fhirledger.conformance.Checks.expect;
import static org.fhirledger.conformance.Checks.expectStatus;
import static org.fhirledger.conformance.Checks.expectThrows;
import static org.fhirledger.conformance.Checks.require;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.client.api.IGenericClient;
import ca.uhn.fhir.rest.client.interceptor.BearerTokenAuthInterceptor;
import ca.uhn.fhir.rest.server.exceptions.AuthenticationException;
import ca.uhn.fhir.rest.server.exceptions.BaseServerResponseException;
import ca.uhn.fhir.rest.server.exceptions.ForbiddenOperationException;
import com.fasterxml.jackson.databind.JsonNode;
import java.util.List;
import java.util.Set;
import java.util.UUID;
import java.util.function.Supplier;
import java.util.stream.Collectors;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.DateType;
import org.hl7.fhir.r4.model.Enumerations.AdministrativeGender;
import org.hl7.fhir.r4.model.IdType;
import org.hl7.fhir.r4.model.Observation;
import org.hl7.fhir.r4.model.Patient;
import org.hl7.fhir.r4.model.Quantity;
import org.hl7.fhir.r4.model.Reference;

/**
 * SMART checks against an `--auth smart` server: HAPI clients carrying tokens through
 * BearerTokenAuthInterceptor. A patient's token must confine it to its own compartment.
 */
final class SmartChecks {
  private static final Set<Integer> DENIED = Set.of(403, 404);
  private static final String PATIENT_SCOPE = "launch/patient patient/*.cruds";

  private final Checks checks;
  private final HttpTrace trace;
  private final FhirContext ctx;
  private final String base;
  private final String adminToken;
  private final EncodingEnum encoding;
  private final String run = UUID.randomUUID().toString().substring(0, 12);

  private SmartAuth auth;
  private SmartAuth.Backend backend;
  private IGenericClient system;
  private IGenericClient patient;
  /** Patient/self logs in; Patient/other is someone else, with an Observation of their own. */
  private String self;
  private String other;
  private String otherObservation;

  SmartChecks(Checks checks, HttpTrace trace, FhirContext ctx, String base, String adminToken, EncodingEnum encoding) {
    this.checks = checks;
    this.trace = trace;
    this.ctx = ctx;
    this.base = base;
    this.adminToken = adminToken;
    this.encoding = encoding;
  }

  void runAll() {
    checks.run("smart: no token -> AuthenticationException (401)", this::unauthenticated);
    checks.run("smart: backend-services token (client_credentials, private_key_jwt ES384)", this::backendToken);
    checks.run("smart: system token creates, reads and searches", this::systemToken);
    checks.run("smart: system/Patient.rs token creating an Observation -> ForbiddenOperationException (403)",
        this::narrowSystemToken);
    checks.run("smart: patient token via authorization code + PKCE (login and consent forms)", this::patientToken);
    checks.run("smart: patient token reads and searches its own data", this::patientReadsOwn);
    checks.run("smart: patient token updates its own Patient (If-Match)", this::patientUpdatesOwn);
    checks.run("smart: patient token reading another patient -> 403/404", this::patientReadsOther);
    checks.run("smart: patient token searching another patient's data discloses nothing", this::patientSearchesOther);
    checks.run("smart: patient token updating another patient -> 403/404, unchanged", this::patientUpdatesOther);
    checks.run("smart: patient token's PUT to another patient's id answers as to an unused id (no existence oracle)",
        this::patientUpdateIsNoOracle);
    checks.run("smart: patient token creating data for another patient -> 403/404", this::patientCreatesForOther);
    checks.run("smart: patient token deleting another patient's Observation -> 403/404, still there",
        this::patientDeletesOther);
  }

  private IGenericClient client(String token) {
    IGenericClient c = Main.newClient(ctx, base, trace);
    if (encoding != null) {
      c.setEncoding(encoding);
    }
    if (token != null) {
      c.registerInterceptor(new BearerTokenAuthInterceptor(token));
    }
    return c;
  }

  private String unauthenticated() {
    AuthenticationException e = expectThrows(AuthenticationException.class, "GET /Patient without a token",
        () -> client(null).search().forResource(Patient.class).count(1).returnBundle(Bundle.class).execute());
    String challenge = trace.lastOf("GET").responseHeader("WWW-Authenticate");
    expect(challenge != null && challenge.startsWith("Bearer"), "WWW-Authenticate %s", challenge);
    return "HTTP " + e.getStatusCode() + ", WWW-Authenticate: " + challenge;
  }

  private String backendToken() throws Exception {
    auth = new SmartAuth(base, adminToken);
    backend = auth.registerBackend("HAPI client conformance backend " + run, "system/*.cruds");
    JsonNode t = backend.token("system/*.cruds");
    expect(t.path("scope").asText().contains("system/*.cruds"), "granted scope %s", t.path("scope"));
    system = client(t.path("access_token").asText());
    return "client " + backend.clientId + ", scope " + t.path("scope").asText() + ", expires_in "
        + t.path("expires_in").asText();
  }

  private Patient newPatient(String label) {
    Patient p = new Patient();
    p.addIdentifier().setSystem(RestChecks.IDENTIFIER_SYSTEM).setValue("smart-" + label + "-" + run);
    p.addName().setFamily("Smart" + label).addGiven("Hapi");
    p.setGender(AdministrativeGender.UNKNOWN);
    return p;
  }

  private Observation newObservation(String patientId) {
    Observation o = new Observation();
    o.setStatus(Observation.ObservationStatus.FINAL);
    o.getCode().addCoding().setSystem("http://loinc.org").setCode("29463-7").setDisplay("Body Weight");
    o.setSubject(new Reference("Patient/" + patientId));
    o.setValue(new Quantity().setValue(70).setUnit("kg").setSystem("http://unitsofmeasure.org").setCode("kg"));
    return o;
  }

  private String systemToken() {
    IGenericClient c = require(system, "system client");
    self = c.create().resource(newPatient("self")).execute().getId().getIdPart();
    other = c.create().resource(newPatient("other")).execute().getId().getIdPart();
    c.create().resource(newObservation(self)).execute();
    otherObservation = c.create().resource(newObservation(other)).execute().getId().getIdPart();
    Patient read = c.read().resource(Patient.class).withId(other).execute();
    expect(other.equals(read.getIdElement().getIdPart()), "read %s", read.getIdElement());
    Bundle found = c.search().forResource(Patient.class)
        .where(Patient.RES_ID.exactly().codes(self, other)).returnBundle(Bundle.class).execute();
    expect(found.getEntry().size() == 2, "Patient?_id=%s,%s: %d entries", self, other, found.getEntry().size());
    String auth = trace.lastOf("GET").header("Authorization");
    expect(auth != null && auth.startsWith("Bearer "), "HAPI sent Authorization %s", auth);
    return "created Patient/" + self + ", Patient/" + other + " and an Observation each; read and _id search";
  }

  private String narrowSystemToken() throws Exception {
    require(backend, "backend client");
    IGenericClient narrow = client(backend.token("system/Patient.rs").path("access_token").asText());
    narrow.read().resource(Patient.class).withId(require(self, "Patient")).execute();
    ForbiddenOperationException e = expectThrows(ForbiddenOperationException.class, "create Observation",
        () -> narrow.create().resource(newObservation(self)).execute());
    return "read allowed; create -> HTTP " + e.getStatusCode();
  }

  private String patientToken() throws Exception {
    require(auth, "SMART configuration");
    JsonNode t = auth.patientToken(require(self, "Patient"), PATIENT_SCOPE, run);
    expect(self.equals(t.path("patient").asText()), "token patient %s, expected %s", t.path("patient"), self);
    List<String> granted = List.of(t.path("scope").asText().split(" "));
    expect(granted.contains("patient/*.cruds"), "granted scope %s", granted);
    patient = client(t.path("access_token").asText());
    return "patient " + t.path("patient").asText() + ", scope " + t.path("scope").asText();
  }

  private String patientReadsOwn() {
    IGenericClient c = require(patient, "patient client");
    Patient me = c.read().resource(Patient.class).withId(self).execute();
    expect(self.equals(me.getIdElement().getIdPart()), "read %s", me.getIdElement());
    Bundle obs = c.search().forResource(Observation.class).where(Observation.PATIENT.hasId(self))
        .returnBundle(Bundle.class).execute();
    expect(obs.getEntry().size() == 1, "own Observations: %d", obs.getEntry().size());
    return "Patient/" + self + " and its Observation";
  }

  private String patientUpdatesOwn() {
    IGenericClient c = require(patient, "patient client");
    Patient me = c.read().resource(Patient.class).withId(self).execute();
    me.setBirthDateElement(new DateType("1980-05-06"));
    String version = c.update().resource(me).execute().getId().getVersionIdPart();
    expect("2".equals(version), "new version %s", version);
    return "Patient/" + self + " -> version " + version;
  }

  private String patientReadsOther() {
    IGenericClient c = require(patient, "patient client");
    int p = expectStatus(DENIED, "read Patient/" + require(other, "other Patient"),
        () -> c.read().resource(Patient.class).withId(other).execute());
    int o = expectStatus(DENIED, "read Observation/" + otherObservation,
        () -> c.read().resource(Observation.class).withId(otherObservation).execute());
    return "Patient/" + other + " -> HTTP " + p + ", Observation/" + otherObservation + " -> HTTP " + o;
  }

  private String patientSearchesOther() {
    IGenericClient c = require(patient, "patient client");
    require(other, "other Patient");
    String obs = deniedOrEmpty(() -> c.search().forResource(Observation.class)
        .where(Observation.PATIENT.hasId(other)).returnBundle(Bundle.class).execute(), "Observation?patient=" + other);
    String pat = deniedOrEmpty(() -> c.search().forResource(Patient.class)
        .where(Patient.RES_ID.exactly().code(other)).returnBundle(Bundle.class).execute(), "Patient?_id=" + other);
    String all = deniedOrEmpty(() -> c.search().forResource(Observation.class)
        .where(Observation.CODE.exactly().systemAndCode("http://loinc.org", "29463-7"))
        .returnBundle(Bundle.class).execute(), "Observation?code=29463-7", Set.of("Observation/" + otherObservation));
    return "Observation?patient=" + other + " " + obs + "; Patient?_id=" + other + " " + pat
        + "; Observation?code (unrestricted) " + all;
  }

  /**
   * The server may refuse (403/404) or answer with only what the token may see (CONTRACT.md:
   * searches leave other patients' resources out); either way nothing of theirs may appear.
   */
  private String deniedOrEmpty(Supplier<Bundle> search, String what) {
    return deniedOrEmpty(search, what, null);
  }

  private String deniedOrEmpty(Supplier<Bundle> search, String what, Set<String> forbidden) {
    Bundle b;
    try {
      b = search.get();
    } catch (BaseServerResponseException e) {
      expect(DENIED.contains(e.getStatusCode()), "%s: %s", what, Checks.describe(e));
      return "-> HTTP " + e.getStatusCode();
    }
    Set<String> ids = b.getEntry().stream().filter(Bundle.BundleEntryComponent::hasResource)
        .map(e -> e.getResource().getIdElement().toUnqualifiedVersionless().getValue()).collect(Collectors.toSet());
    if (forbidden == null) {
      expect(ids.isEmpty() && (!b.hasTotal() || b.getTotal() == 0), "%s disclosed %s (total %s)", what, ids,
          b.hasTotal() ? b.getTotal() : "absent");
      return "-> 200, empty";
    }
    Set<String> leaked = ids.stream().filter(forbidden::contains).collect(Collectors.toSet());
    expect(leaked.isEmpty(), "%s disclosed %s", what, leaked);
    expect(ids.stream().allMatch(id -> !id.startsWith("Patient/") || id.equals("Patient/" + self)),
        "%s disclosed other patients: %s", what, ids);
    return "-> 200, " + ids.size() + " own";
  }

  private String patientUpdatesOther() {
    IGenericClient c = require(patient, "patient client");
    Patient before = require(system, "system client").read().resource(Patient.class).withId(require(other, "other"))
        .execute();
    Patient changed = before.copy();
    changed.setGender(AdministrativeGender.FEMALE);
    int plain = expectStatus(DENIED, "update Patient/" + other, () -> c.update().resource(changed).execute());
    // Without a version: no If-Match, a plain PUT.
    Patient unversioned = changed.copy();
    unversioned.setId(new IdType("Patient", other));
    int put = expectStatus(DENIED, "update Patient/" + other + " without If-Match",
        () -> c.update().resource(unversioned).execute());
    int patch = expectStatus(DENIED, "patch Patient/" + other, () -> c.patch()
        .withBody("[{\"op\":\"replace\",\"path\":\"/gender\",\"value\":\"female\"}]")
        .withId(new IdType("Patient", other)).execute());
    Patient after = system.read().resource(Patient.class).withId(other).execute();
    expect(after.getIdElement().getVersionIdPart().equals(before.getIdElement().getVersionIdPart())
        && after.getGender() == before.getGender(), "Patient/%s changed: %s gender %s", other, after.getIdElement(),
        after.getGender());
    return "PUT with If-Match -> HTTP " + plain + ", PUT -> HTTP " + put + ", PATCH -> HTTP " + patch
        + "; unchanged at version " + after.getIdElement().getVersionIdPart();
  }

  private String patientUpdateIsNoOracle() {
    IGenericClient c = require(patient, "patient client");
    Patient theirs = newPatient("other");
    theirs.setId(new IdType("Patient", require(other, "other Patient")));
    Patient unused = newPatient("unused");
    String unusedId = "hapi-unused-" + run;
    unused.setId(new IdType("Patient", unusedId));
    int existing = expectStatus(DENIED, "PUT Patient/" + other, () -> c.update().resource(theirs).execute());
    int missing = expectStatus(DENIED, "PUT Patient/" + unusedId, () -> c.update().resource(unused).execute());
    // Reads hide other patients behind the 404 of a missing resource; writes must not undo that.
    expect(existing == missing, "PUT Patient/%s (exists, another patient's) -> HTTP %d but PUT Patient/%s (unused id)"
        + " -> HTTP %d: the status tells a patient-scoped token which ids exist", other, existing, unusedId, missing);
    return "both HTTP " + existing;
  }

  private String patientCreatesForOther() {
    IGenericClient c = require(patient, "patient client");
    int status = expectStatus(DENIED, "create Observation for Patient/" + require(other, "other"),
        () -> c.create().resource(newObservation(other)).execute());
    Bundle theirs = require(system, "system client").search().forResource(Observation.class)
        .where(Observation.PATIENT.hasId(other)).returnBundle(Bundle.class).execute();
    expect(theirs.getEntry().size() == 1, "Patient/%s now has %d Observations", other, theirs.getEntry().size());
    return "HTTP " + status + ", nothing created";
  }

  private String patientDeletesOther() {
    IGenericClient c = require(patient, "patient client");
    String id = require(otherObservation, "other's Observation");
    int status = expectStatus(DENIED, "delete Observation/" + id,
        () -> c.delete().resourceById(new IdType("Observation", id)).execute());
    Observation still = require(system, "system client").read().resource(Observation.class).withId(id).execute();
    expect(id.equals(still.getIdElement().getIdPart()), "read back %s", still.getIdElement());
    return "Observation/" + id + " -> HTTP " + status + ", still readable by the system token";
  }
}
