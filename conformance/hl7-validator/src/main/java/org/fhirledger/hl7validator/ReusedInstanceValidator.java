package org.fhirledger.hl7validator;

import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.SingleValidationMessage;
import com.fasterxml.jackson.databind.JsonNode;
import java.io.ByteArrayInputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;
import org.hl7.fhir.exceptions.FHIRException;
import org.hl7.fhir.r5.context.IWorkerContext;
import org.hl7.fhir.r5.elementmodel.Manager.FhirFormat;
import org.hl7.fhir.r5.model.StructureDefinition;
import org.hl7.fhir.r5.utils.validation.ValidatorSession;
import org.hl7.fhir.r5.utils.validation.constants.IdStatus;
import org.hl7.fhir.r5.utils.xver.XVerExtensionManagerOld;
import org.hl7.fhir.utilities.validation.ValidationMessage;
import org.hl7.fhir.validation.ValidatorSettings;
import org.hl7.fhir.validation.instance.InstanceValidator;

/**
 * What HAPI's FhirInstanceValidator does for one JSON resource (its ValidatorWrapper and
 * BaseValidatorBridge, HAPI 8.8.1), with one difference: the core InstanceValidator is built
 * once per thread and reused, instead of once per resource.
 *
 * <p>Why: building one costs ~30 ms of CPU (it re-reads a 21,000-line OID registry from its
 * jar, and sets up FHIRPath and profile utilities), several times the validation of a typical
 * resource. The core validator is made for reuse: its main entry point clears its per-run
 * state first. Not all of it, though: a cache of executed constraints keeps every validated
 * element alive, so each validator is replaced after {@link #USES} resources. The settings
 * are read from the configured FhirInstanceValidator, the worker context (definitions,
 * terminology) is the one HAPI built for it, and {@code --fresh-validator-per-resource} runs
 * HAPI's own path to cross-check the two (identical findings on 20,105 resources).
 */
final class ReusedInstanceValidator implements Engine.ResourceValidator {
  /** Resources per core validator: its build cost spread thin, its caches kept small. */
  static final int USES = 200;

  private final FhirInstanceValidator module;
  private final IWorkerContext context;
  private final boolean errorForUnknownProfiles;
  private InstanceValidator validator;
  private int uses;

  ReusedInstanceValidator(FhirInstanceValidator module, IWorkerContext context) {
    this.module = module;
    this.context = context;
    this.errorForUnknownProfiles = module.isErrorForUnknownProfiles();
  }

  private InstanceValidator build() {
    InstanceValidator validator = new InstanceValidator(context,
        Objects.requireNonNullElseGet(module.getHostApplicationServices(), FhirInstanceValidator.NullEvaluationContext::new),
        new XVerExtensionManagerOld(context), new ValidatorSession(), new ValidatorSettings());
    // The same settings, in the same order, as HAPI's ValidatorWrapper applies them.
    validator.setAssumeValidRestReferences(module.isAssumeValidRestReferences());
    validator.setBestPracticeWarningLevel(module.getBestPracticeWarningLevel());
    validator.setAnyExtensionsAllowed(module.isAnyExtensionsAllowed());
    validator.setResourceIdRule(IdStatus.OPTIONAL);
    validator.setNoTerminologyChecks(module.isNoTerminologyChecks());
    validator.setErrorForUnknownProfiles(module.isErrorForUnknownProfiles());
    validator.setUnknownCodeSystemsCauseErrors(true);
    validator.getExtensionDomains().addAll(module.getExtensionDomains());
    validator.setFetcher(module.getValidatorResourceFetcher());
    validator.setPolicyAdvisor(module.getValidatorPolicyAdvisor());
    validator.setNoExtensibleWarnings(module.isNoExtensibleWarnings());
    validator.setNoBindingMsgSuppressed(module.isNoBindingMsgSuppressed());
    validator.setAllowExamples(module.isAllowExamples());
    validator.setAllowXsiLocation(true);
    return validator;
  }

  @Override
  public List<SingleValidationMessage> validate(String json, JsonNode resource) {
    // Claimed profiles are validated against when we have them; HAPI reports the ones it
    // lacks only when it has none of them at all.
    List<StructureDefinition> profiles = new ArrayList<>();
    List<ValidationMessage> unknown = new ArrayList<>();
    for (JsonNode p : resource.path("meta").path("profile")) {
      try {
        StructureDefinition sd = context.fetchResource(StructureDefinition.class, p.asText());
        if (sd != null) {
          profiles.add(sd);
        } else {
          ValidationMessage m = new ValidationMessage();
          m.setMessageId("Validation_VAL_Profile_Unknown");
          m.setLevel(ValidationMessage.IssueSeverity.ERROR);
          m.setMessage("Invalid profile. Failed to retrieve profile with url=" + p.asText());
          unknown.add(m);
        }
      } catch (FHIRException e) {
        // as HAPI: a profile that fails to load is skipped
      }
    }
    if (validator == null || uses++ == USES) {
      validator = build();
      uses = 1;
    }
    List<ValidationMessage> messages = new ArrayList<>();
    validator.validate(null, messages, new ByteArrayInputStream(json.getBytes(StandardCharsets.UTF_8)), FhirFormat.JSON, profiles);
    if (profiles.isEmpty()) messages.addAll(unknown);

    List<SingleValidationMessage> out = new ArrayList<>(messages.size());
    for (ValidationMessage m : messages) {
      String id = m.getMessageId();
      // HAPI drops these two (a binding without a source; the mimetypes value set it lacks).
      if ("Terminology_TX_Binding_NoSource".equals(id)) continue;
      if ("Terminology_TX_ValueSet_NotFound".equals(id) && m.getMessage().contains("http://hl7.org/fhir/ValueSet/mimetypes")) continue;
      if ("Validation_VAL_Profile_Unknown".equals(id) || "VALIDATION_VAL_PROFILE_UNKNOWN_NOT_POLICY".equals(id)) {
        m.setLevel(errorForUnknownProfiles ? ValidationMessage.IssueSeverity.ERROR : ValidationMessage.IssueSeverity.WARNING);
      }
      out.add(toHapi(m));
    }
    return out;
  }

  /** As HAPI's BaseValidatorBridge turns a core message into its own. */
  private static SingleValidationMessage toHapi(ValidationMessage m) {
    SingleValidationMessage s = new SingleValidationMessage();
    if (m.getCol() != -1) s.setLocationCol(m.getCol());
    if (m.getLine() != -1) s.setLocationLine(m.getLine());
    s.setLocationString(m.getLocation());
    s.setMessage(m.getMessage());
    if (m.getLevel() != null) s.setSeverity(ResultSeverityEnum.fromCode(m.getLevel().toCode()));
    if (m.getMessageId() != null && !m.getMessageId().contains(" ")) s.setMessageId(m.getMessageId());
    if (m.hasSliceInfo()) s.setSliceMessages(m.getSliceInfo().stream().map(ValidationMessage::getMessage).toList());
    return s;
  }
}
