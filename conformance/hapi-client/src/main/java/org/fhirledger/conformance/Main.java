package org.fhirledger.conformance;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.client.api.IGenericClient;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;

/**
 * HAPI FHIR generic-client conformance checks against fhir-ledger.
 *
 * <p>Environment: FHIR_BASE (a server with --auth off), SMART_BASE and SMART_ADMIN_TOKEN (a
 * server with --auth smart), HAPI_SYNTHEA_BUNDLE (a Synthea transaction bundle). Prints one line
 * per check and a summary; exits 1 if any check failed.
 */
public final class Main {
  private Main() {}

  public static void main(String[] args) {
    String fhirBase = trimSlash(System.getenv("FHIR_BASE"));
    String smartBase = trimSlash(System.getenv("SMART_BASE"));
    String adminToken = System.getenv("SMART_ADMIN_TOKEN");
    String bundle = System.getenv("HAPI_SYNTHEA_BUNDLE");

    HttpTrace trace = new HttpTrace();
    Checks checks = new Checks(List.of(trace));
    FhirContext ctx = FhirContext.forR4();
    // A 523-entry transaction takes longer than HAPI's 10 s default read timeout.
    ctx.getRestfulClientFactory().setSocketTimeout(180_000);

    EncodingEnum encoding = EncodingEnum.JSON;
    if (fhirBase == null || bundle == null || !Files.isReadable(Path.of(bundle))) {
      checks.run("setup", () -> {
        throw new AssertionError("FHIR_BASE and a readable HAPI_SYNTHEA_BUNDLE are required (got " + fhirBase
            + ", " + bundle + ")");
      });
    } else {
      System.out.println("hapi-client: HAPI FHIR " + ctx.getVersion().getVersion() + " client against " + fhirBase);
      RestChecks rest = new RestChecks(checks, trace, ctx, fhirBase, Path.of(bundle));
      rest.runAll();
      encoding = rest.encoding();
    }

    if (smartBase == null || adminToken == null || adminToken.isEmpty()) {
      checks.run("smart: setup", () -> {
        throw new AssertionError("SMART_BASE and SMART_ADMIN_TOKEN are required");
      });
    } else {
      System.out.println("hapi-client: SMART checks against " + smartBase);
      new SmartChecks(checks, trace, ctx, smartBase, adminToken, encoding).runAll();
    }

    System.out.println("hapi-client: " + checks.summary());
    System.exit(checks.failed() == 0 ? 0 : 1);
  }

  /** A HAPI generic client as a user makes one, with the trace interceptor on it. */
  static IGenericClient newClient(FhirContext ctx, String base, HttpTrace trace) {
    IGenericClient client = ctx.newRestfulGenericClient(base);
    client.registerInterceptor(trace);
    return client;
  }

  private static String trimSlash(String url) {
    if (url == null || url.isBlank()) {
      return null;
    }
    return url.endsWith("/") ? url.substring(0, url.length() - 1) : url;
  }
}
