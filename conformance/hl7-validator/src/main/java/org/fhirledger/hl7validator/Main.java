package org.fhirledger.hl7validator;

import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.SingleValidationMessage;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.io.PrintStream;
import java.lang.management.ManagementFactory;
import java.net.Proxy;
import java.net.ProxySelector;
import java.net.SocketAddress;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

/**
 * Validates every resource in a capture with the HL7 FHIR validator (HAPI's
 * FhirInstanceValidator), offline, against R4 and the US Core 5.0.1 profiles we have.
 *
 * <pre>java ... Main CAPTURE.ndjson --us-core FILE [--report FILE] [--known-data-errors FILE] [--threads N] [--fresh-validator-per-resource]</pre>
 *
 * Exit codes: 0 no error, 1 the validator found errors, 2 usage, input or offline-policy failure.
 */
public final class Main {
  private static final String USAGE =
      "usage: Main CAPTURE.ndjson --us-core uscore-v5.0.1-structuredefinitions.json [--report FILE] [--threads N]"
          + " [--fresh-validator-per-resource]";

  public static void main(String[] args) throws Exception {
    Path capture = null, usCore = null, report = null, knownData = null;
    int threads = 2;
    boolean fresh = false;
    for (int i = 0; i < args.length; i++) {
      String a = args[i];
      switch (a) {
        case "--us-core" -> usCore = Path.of(value(args, ++i, a));
        case "--report" -> report = Path.of(value(args, ++i, a));
        case "--known-data-errors" -> knownData = Path.of(value(args, ++i, a));
        case "--threads" -> threads = Integer.parseInt(value(args, ++i, a));
        case "--fresh-validator-per-resource" -> fresh = true;
        case "-h", "--help" -> {
          System.out.println(USAGE);
          return;
        }
        default -> {
          if (a.startsWith("-") || capture != null) fail("unexpected argument " + a);
          capture = Path.of(a);
        }
      }
    }
    if (capture == null || usCore == null) fail("missing argument");
    if (!Files.isReadable(capture)) fail("cannot read capture " + capture);
    if (!Files.isReadable(usCore)) fail("cannot read US Core definitions " + usCore);

    // A tripwire under the core library's own prohibition: anything that still opens a URL
    // through the JVM's proxy selection is recorded and sent to a closed loopback port.
    NetworkTripwire tripwire = new NetworkTripwire();
    ProxySelector.setDefault(tripwire);

    ObjectMapper json = new ObjectMapper();
    long t0 = System.nanoTime();
    Engine engine = new Engine(usCore);
    Capture cap = Capture.read(capture);
    int n = Math.max(1, threads);
    boolean freshPerResource = fresh;
    ThreadLocal<Engine.ResourceValidator> validators = ThreadLocal.withInitial(() -> engine.newValidator(freshPerResource));
    ExecutorService pool = Executors.newFixedThreadPool(n, r -> {
      Thread t = new Thread(r, "validator");
      t.setDaemon(true);
      return t;
    });
    // Startup (reading the definitions and the capture) ends once each thread has its
    // validator and has run it once; the clock for throughput starts after that. One thread
    // after the other: HAPI loads its bundled definitions lazily, and two threads starting at
    // once would each load a copy.
    for (int i = 0; i < n; i++) {
      pool.submit(() -> validators.get().validate(WARM_UP, json.readTree(WARM_UP))).get();
    }
    long t1 = System.nanoTime();
    long cpu1 = cpuNanos();

    List<Future<Outcome>> futures = new ArrayList<>(cap.items.size());
    for (Capture.Item item : cap.items) {
      futures.add(pool.submit(() -> validate(validators.get(), json, item)));
    }
    Report rep = new Report(engine, cap, n);
    if (knownData != null) rep.knownDataErrors(knownData);
    for (int i = 0; i < futures.size(); i++) {
      rep.add(futures.get(i).get());
      futures.set(i, null); // in capture order, so examples are stable; drop each result once counted
    }
    pool.shutdown();
    long t2 = System.nanoTime();

    rep.finish((t1 - t0) / 1e9, (t2 - t1) / 1e9, (cpuNanos() - cpu1) / 1e9, tripwire.attempts);
    PrintStream out = new PrintStream(System.out, false, StandardCharsets.UTF_8);
    rep.print(out);
    out.flush();
    if (report != null) {
      json.writerWithDefaultPrettyPrinter().writeValue(report.toFile(), rep.toJson(json));
    }
    System.exit(!tripwire.attempts.isEmpty() || !cap.unreadable.isEmpty() ? 2 : rep.errorCount() > 0 ? 1 : 0);
  }

  /** What validating one resource gave: its identity, contents and the validator's messages. */
  record Outcome(Capture.Item item, JsonNode resource, List<SingleValidationMessage> messages) {}

  private static final String WARM_UP = "{\"resourceType\":\"Basic\",\"code\":{\"text\":\"warm-up\"}}";

  private static Outcome validate(Engine.ResourceValidator v, ObjectMapper json, Capture.Item item) throws IOException {
    JsonNode resource = json.readTree(item.json);
    List<SingleValidationMessage> messages;
    try {
      messages = v.validate(item.json, resource);
    } catch (RuntimeException e) {
      // A crash of the validator on a resource is a finding too, never a silent skip.
      SingleValidationMessage m = new SingleValidationMessage();
      m.setSeverity(ResultSeverityEnum.ERROR);
      m.setMessageId("VALIDATOR_EXCEPTION");
      m.setLocationString(resource.path("resourceType").asText("?"));
      m.setMessage("the validator failed on this resource: " + e);
      messages = List.of(m);
    }
    return new Outcome(item, resource, messages);
  }

  /** CPU time of this process: the machine may be shared, wall-clock time alone misleads. */
  private static long cpuNanos() {
    return ((com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean()).getProcessCpuTime();
  }

  private static String value(String[] args, int i, String flag) {
    if (i >= args.length) fail(flag + " needs a value");
    return args[i];
  }

  private static void fail(String why) {
    System.err.println("hl7-validator: " + why);
    System.err.println(USAGE);
    System.exit(2);
  }

  private static final class NetworkTripwire extends ProxySelector {
    final List<String> attempts = Collections.synchronizedList(new ArrayList<>());

    @Override
    public List<Proxy> select(URI uri) {
      attempts.add(uri.toString());
      return List.of(new Proxy(Proxy.Type.HTTP, new java.net.InetSocketAddress("127.0.0.1", 9)));
    }

    @Override
    public void connectFailed(URI uri, SocketAddress sa, IOException ioe) {}
  }
}
