package org.fhirledger.hl7validator;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.SingleValidationMessage;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.PrePopulatedValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;
import org.hl7.fhir.r4.model.StructureDefinition;
import org.hl7.fhir.r5.context.IWorkerContext;
import org.hl7.fhir.r5.utils.validation.constants.BestPracticeWarningLevel;
import org.hl7.fhir.utilities.http.ManagedWebAccess;

/** The HAPI validation support chain (shared, thread-safe) and validators made from it. */
final class Engine {
  final FhirContext ctx = FhirContext.forR4Cached();
  final ValidationSupportChain chain;
  final List<String> usCoreProfiles = new ArrayList<>();
  private final Module module;
  private final IWorkerContext workerContext;

  Engine(Path usCoreFile) throws IOException {
    // The core library's own switch for every web access it makes (package downloads,
    // terminology servers): validation here must never leave the machine.
    ManagedWebAccess.setAccessPolicy(ManagedWebAccess.WebAccessPolicy.PROHIBITED);

    PrePopulatedValidationSupport usCore = new PrePopulatedValidationSupport(ctx);
    JsonNode all = new ObjectMapper().readTree(usCoreFile.toFile());
    if (!all.isArray()) throw new IOException(usCoreFile + ": expected a JSON array of StructureDefinitions");
    for (JsonNode sd : all) {
      StructureDefinition def = ctx.newJsonParser().parseResource(StructureDefinition.class, sd.toString());
      usCore.addStructureDefinition(def);
      usCoreProfiles.add(def.getUrl() + "|" + def.getVersion());
    }

    // Order matters only for who answers first; none of these makes a remote call.
    chain = new ValidationSupportChain(
        new DefaultProfileValidationSupport(ctx),
        usCore,
        new CommonCodeSystemsTerminologyService(ctx),
        new InMemoryTerminologyServerValidationSupport(ctx),
        new SnapshotGeneratingValidationSupport(ctx));
    // FHIR: a CodeableConcept is in a value set when any of its codings is (Body temperature
    // 8310-5 + Oral temperature 8331-1 is a vital sign). HAPI's default wants all of them.
    chain.setCodeableConceptValidationSuccessfulIfNotAllCodingsAreValid(true);
    module = configured();
    // Built here, once: converting every R4 definition for the core validator is the startup.
    workerContext = module.context();
  }

  /** Validates one resource (its JSON text; its parsed tree for what we read of it). */
  interface ResourceValidator {
    List<SingleValidationMessage> validate(String json, JsonNode resource);
  }

  /** FhirInstanceValidator, with access to the worker context it builds from the chain. */
  private static final class Module extends FhirInstanceValidator {
    Module(IValidationSupport support) {
      super(support);
    }

    IWorkerContext context() {
      return provideWorkerContext();
    }
  }

  private Module configured() {
    Module module = new Module(chain);
    // Claimed profiles we do not have (most of US Core) are reported by us as "not checkable
    // offline", never as errors; with this off the validator says so as a warning we can sort.
    module.setErrorForUnknownProfiles(false);
    // Extensions whose definition is not available cannot be checked offline; allowed, they
    // come back as messages we list by URL instead of as errors.
    module.setAnyExtensionsAllowed(true);
    // Best-practice rules (dom-6 "should have narrative", "observations should have a
    // performer") are hints: counted as information, so warnings stay about questionable data.
    module.setBestPracticeWarningLevel(BestPracticeWarningLevel.Hint);
    // Terminology is checked, in memory; only what needs a terminology server is not.
    module.setNoTerminologyChecks(false);
    // Keep extensible-binding warnings: they are findings about codes.
    module.setNoExtensibleWarnings(false);
    // References are never fetched (offline), but a relative one names its target's type:
    // with this on, the validator checks that type against the element's allowed targets
    // (Reference(Organization) given Patient/123 is an error) and assumes the target valid.
    module.setAssumeValidRestReferences(true);
    return module;
  }

  /**
   * A validator for one thread. Both kinds share the chain and the one worker context HAPI
   * builds from it (thread-safe: HAPI servers share it across request threads).
   *
   * @param freshPerResource HAPI's own path: FhirValidator + FhirInstanceValidator, which
   *     builds a new core validator for every resource (slow; for cross-checking)
   */
  ResourceValidator newValidator(boolean freshPerResource) {
    if (freshPerResource) {
      FhirValidator v = ctx.newValidator();
      v.registerValidatorModule(module);
      // Whole bundles in one pass, so Bundle rules (fullUrl vs id, entry references) apply.
      v.setConcurrentBundleValidation(false);
      return (json, resource) -> v.validateWithResult(json).getMessages();
    }
    return new ReusedInstanceValidator(module, workerContext);
  }

  /** Whether a claimed profile (canonical, maybe with |version) is available offline. */
  boolean hasProfile(String canonical) {
    return chain.fetchStructureDefinition(canonical) != null;
  }
}
