package org.fhirledger.hl7validator;

import ca.uhn.fhir.util.VersionUtil;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.SingleValidationMessage;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.PrintStream;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/** Sorts the validator's messages into findings and what could not be checked offline. */
final class Report {
  /** One message of the validator, with where it came from. */
  record Finding(String request, int status, String resource, String severity, String messageId,
      String location, String message) {}

  /** Messages of one kind: how many, one example, and which subjects (URLs) they were about. */
  static final class Group {
    final String severity, messageId, template;
    final Finding example;
    int count;
    final Map<String, Integer> subjects = new TreeMap<>();
    final List<Finding> all = new ArrayList<>(); // kept for errors only
    /** Distinct resources (Type/id) the messages were about: one resource may come back often. */
    final Set<String> resources = new HashSet<>();

    Group(String severity, String messageId, String template, Finding example) {
      this.severity = severity;
      this.messageId = messageId;
      this.template = template;
      this.example = example;
    }
  }

  private final Engine engine;
  private final Capture capture;
  private final int threads;
  private final Map<String, int[]> types = new TreeMap<>(); // type -> {top-level, inside Bundles}
  private final Map<String, Integer> claimed = new TreeMap<>(); // profile -> resources claiming it
  private final Map<String, Boolean> available = new HashMap<>();
  private final Map<String, Group> errors = new LinkedHashMap<>();
  private final Map<String, Group> warnings = new LinkedHashMap<>();
  private final Map<String, Group> information = new LinkedHashMap<>();
  private final Map<String, Group> profileMessages = new LinkedHashMap<>();
  private final Map<String, Group> terminology = new LinkedHashMap<>();
  private final Map<String, Group> extensions = new LinkedHashMap<>();
  private int topLevel, inBundles;
  private double startupSeconds, validationSeconds, validationCpuSeconds;
  private List<String> networkAttempts = List.of();

  Report(Engine engine, Capture capture, int threads) {
    this.engine = engine;
    this.capture = capture;
    this.threads = threads;
  }

  void add(Main.Outcome o) {
    JsonNode r = o.resource();
    topLevel++;
    count(r, false);
    String self = r.path("resourceType").asText("?") + "/" + r.path("id").asText("-");
    Set<String> unexpandable = unexpandableLocations(o.messages());
    for (SingleValidationMessage m : o.messages()) {
      // Inside a Bundle the validator names the entry as /*Type/id*/ in the location.
      String loc = m.getLocationString() == null ? "" : m.getLocationString();
      Matcher inner = INNER.matcher(loc);
      String resource = inner.find() ? self + " > " + inner.group(1) : self;
      String sev = m.getSeverity() == null ? "information" : m.getSeverity().getCode();
      String id = m.getMessageId() == null ? "" : m.getMessageId();
      Finding f = new Finding(o.item().request, o.item().status, resource, sev, id, loc, m.getMessage());
      file(f, classify(m, unexpandable));
    }
  }

  /** Counts a resource and, for a Bundle, the resources in its entries; notes claimed profiles. */
  private void count(JsonNode r, boolean entry) {
    String type = r.path("resourceType").asText("?");
    types.computeIfAbsent(type, k -> new int[2])[entry ? 1 : 0]++;
    if (entry) inBundles++;
    for (JsonNode p : r.path("meta").path("profile")) {
      claimed.merge(p.asText(), 1, Integer::sum);
    }
    if (type.equals("Bundle")) {
      for (JsonNode e : r.path("entry")) {
        if (e.has("resource")) count(e.get("resource"), true);
      }
    }
  }

  // ---- classification -------------------------------------------------------------------

  private static final Pattern INNER = Pattern.compile("/\\*(\\S+?)\\*/");
  private static final Pattern URL = Pattern.compile("(?:https?://|urn:)[^\\s'\"|,()\\]]+");

  private enum Kind { ERROR, DATA, WARNING, INFORMATION, PROFILE, EXTENSION, TERMINOLOGY }

  /** An error the test data carries as sent (known-data-errors.json), matched narrowly. */
  record Known(Set<String> messageIds, Pattern message, Pattern location, Pattern resource, String why) {
    boolean matches(Finding f) {
      return messageIds.contains(f.messageId())
          && (message == null || message.matcher(f.message() == null ? "" : f.message()).find())
          && (location == null || location.matcher(f.location() == null ? "" : f.location()).find())
          && (resource == null || resource.matcher(f.resource()).find());
    }
  }

  private final List<Known> known = new ArrayList<>();
  private final Map<Known, Group> dataErrors = new LinkedHashMap<>();

  /**
   * Loads the known data errors (a JSON file: {"known": [{messageId, message?, location?,
   * resource?, why}]}); messageId is one id or a list of them; the others are regular
   * expressions, `resource` over "Type/id" (or "Bundle/id > Type/id" for an entry).
   */
  void knownDataErrors(java.nio.file.Path file) throws java.io.IOException {
    JsonNode root = new ObjectMapper().readTree(file.toFile());
    for (JsonNode k : root.path("known")) {
      Set<String> ids = new HashSet<>();
      if (k.path("messageId").isArray()) k.path("messageId").forEach(id -> ids.add(id.asText()));
      else ids.add(k.path("messageId").asText());
      known.add(new Known(ids,
          k.has("message") ? Pattern.compile(k.get("message").asText()) : null,
          k.has("location") ? Pattern.compile(k.get("location").asText()) : null,
          k.has("resource") ? Pattern.compile(k.get("resource").asText()) : null,
          k.path("why").asText()));
    }
  }

  /**
   * A claimed profile could not be found: it is not available offline (all of US Core but the
   * 8 definitions we have), so nothing about it was checked.
   */
  private static final Set<String> PROFILE_UNKNOWN = Set.of(
      "VALIDATION_VAL_PROFILE_UNKNOWN",
      "VALIDATION_VAL_PROFILE_UNKNOWN_NOT_POLICY",
      "VALIDATION_VAL_PROFILE_UNKNOWN_ERROR",
      "VALIDATION_VAL_PROFILE_UNKNOWN_ERROR_NETWORK");

  /** An extension's definition could not be found: the extension was not checked. */
  private static final Set<String> EXTENSION_UNKNOWN = Set.of(
      "EXTENSION_EXT_UNKNOWN",
      "EXTENSION_EXT_UNKNOWN_NOTHERE");

  /**
   * A code could not be checked: its code system has no content offline (SNOMED CT, LOINC,
   * RxNorm, CVX, ...) or the value set is missing (those of profiles we lack). These say
   * nothing about whether the code is right.
   */
  private static final Set<String> TERMINOLOGY_UNCHECKABLE = Set.of(
      "TERMINOLOGY_TX_SYSTEM_UNKNOWN",
      "TERMINOLOGY_TX_SYSTEM_UNSUPPORTED",
      "TERMINOLOGY_TX_SYSTEM_NOT_USABLE",
      "UNKNOWN_CODESYSTEM",
      "UNKNOWN_CODESYSTEM_VERSION",
      "TERMINOLOGY_TX_VALUESET_NOTFOUND",
      "TERMINOLOGY_TX_VALUESET_NOTFOUND_CS",
      "TERMINOLOGY_TX_NOVALID_1_CC_UNABLE_TO_EXPAND",
      "VALUESET_TOO_COSTLY");

  /** Texts of the terminology layer (often under the generic PassThrough id) that mean the same. */
  private static final List<String> UNCHECKABLE_TEXT = List.of(
      "CodeSystem is unknown and can't be validated",
      "could not be found, so the code cannot be validated",
      "Unable to expand ValueSet",
      "Failed to expand ValueSet",
      "Unable to resolve value set",
      "unable to find value set");

  /** Of those, the ones that mean the value set itself could not be expanded here. */
  private static final List<String> EXPANSION_FAILED_TEXT = List.of(
      "Unable to expand ValueSet", "Failed to expand ValueSet", "Unable to resolve value set", "unable to find value set");

  /** Message ids compared upper-cased: the core spells the same id in either case by version. */
  private static boolean in(Set<String> ids, String id) {
    return ids.contains(id.toUpperCase(Locale.ROOT));
  }

  private static boolean mentions(String msg, List<String> texts) {
    return msg != null && texts.stream().anyMatch(msg::contains);
  }

  /**
   * Where a binding's value set could not be expanded (all of LOINC, say), the validator
   * also says the code is "not in the value set": that verdict was not reached by a check, so
   * it goes with the not-checkable terminology of the same element, not with the warnings.
   */
  private static Set<String> unexpandableLocations(List<SingleValidationMessage> messages) {
    Set<String> at = new HashSet<>();
    for (SingleValidationMessage m : messages) {
      String id = m.getMessageId() == null ? "" : m.getMessageId().toUpperCase(Locale.ROOT);
      if (id.startsWith("TERMINOLOGY_TX_VALUESET_NOTFOUND") || mentions(m.getMessage(), EXPANSION_FAILED_TEXT)) {
        at.add(m.getLocationString());
      }
    }
    return at;
  }

  private static Kind classify(SingleValidationMessage m, Set<String> unexpandable) {
    String id = m.getMessageId() == null ? "" : m.getMessageId();
    if (in(PROFILE_UNKNOWN, id)) return Kind.PROFILE;
    if (in(EXTENSION_UNKNOWN, id)) return Kind.EXTENSION;
    if (in(TERMINOLOGY_UNCHECKABLE, id) || mentions(m.getMessage(), UNCHECKABLE_TEXT)) return Kind.TERMINOLOGY;
    if (id.toUpperCase(Locale.ROOT).startsWith("TERMINOLOGY_TX_NOVALID") && unexpandable.contains(m.getLocationString())) {
      return Kind.TERMINOLOGY;
    }
    ResultSeverityEnum sev = m.getSeverity();
    if (sev == ResultSeverityEnum.ERROR || sev == ResultSeverityEnum.FATAL) return Kind.ERROR;
    if (sev == ResultSeverityEnum.WARNING) return Kind.WARNING;
    return Kind.INFORMATION;
  }

  private void file(Finding f, Kind kind) {
    if (kind == Kind.ERROR) {
      for (Known k : known) {
        if (k.matches(f)) {
          Group g = dataErrors.computeIfAbsent(k, x -> new Group(f.severity(), f.messageId(), template(f.message()), f));
          g.count++;
          g.resources.add(f.resource());
          return;
        }
      }
    }
    Map<String, Group> into = switch (kind) {
      case DATA -> throw new IllegalStateException("data errors are filed by their known entry");
      case ERROR -> errors;
      case WARNING -> warnings;
      case INFORMATION -> information;
      case PROFILE -> profileMessages;
      case EXTENSION -> extensions;
      case TERMINOLOGY -> terminology;
    };
    String template = template(f.message());
    String key = f.severity() + "\u0000" + f.messageId() + "\u0000" + template;
    Group g = into.computeIfAbsent(key, k -> new Group(f.severity(), f.messageId(), template, f));
    g.count++;
    g.resources.add(f.resource());
    if (kind == Kind.ERROR) g.all.add(f);
    if (kind == Kind.PROFILE || kind == Kind.EXTENSION || kind == Kind.TERMINOLOGY) {
      Matcher u = URL.matcher(f.message() == null ? "" : f.message());
      if (u.find()) g.subjects.merge(u.group(), 1, Integer::sum);
    }
  }

  private static final Pattern UUID_LIKE = Pattern.compile("\\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\\b");
  private static final Pattern REFERENCE = Pattern.compile("\\b([A-Z][A-Za-z]+)/[A-Za-z0-9\\-.]{1,64}");
  private static final Pattern NUMBER = Pattern.compile("(?<![\\w-])\\d+(?:\\.\\d+)*(?![\\w-])");

  /** The message with its particulars (quoted values, URLs, ids, numbers) blanked, to group by. */
  static String template(String msg) {
    if (msg == null) return "";
    String t = msg.replaceAll("(?<!\\w)'[^']*'(?!\\w)", "'…'").replaceAll("\"[^\"]*\"", "\"…\"");
    t = URL.matcher(t).replaceAll("<url>");
    t = UUID_LIKE.matcher(t).replaceAll("<id>");
    t = REFERENCE.matcher(t).replaceAll("$1/<id>");
    return NUMBER.matcher(t).replaceAll("#");
  }

  // ---- results --------------------------------------------------------------------------

  void finish(double startup, double validation, double validationCpu, List<String> network) {
    this.startupSeconds = startup;
    this.validationSeconds = validation;
    this.validationCpuSeconds = validationCpu;
    this.networkAttempts = List.copyOf(network);
    for (String p : claimed.keySet()) available.put(p, engine.hasProfile(p));
  }

  int errorCount() {
    return errors.values().stream().mapToInt(g -> g.count).sum();
  }

  private static int sum(Map<String, Group> m) {
    return m.values().stream().mapToInt(g -> g.count).sum();
  }

  private static List<Group> byCount(Map<String, Group> m) {
    List<Group> l = new ArrayList<>(m.values());
    l.sort(Comparator.comparingInt((Group g) -> -g.count).thenComparing(g -> g.template));
    return l;
  }

  private String versions() {
    return "HAPI FHIR " + VersionUtil.getVersion() + ", HL7 FHIR core " + org.hl7.fhir.utilities.VersionUtil.getVersion();
  }

  void print(PrintStream out) {
    out.printf("HL7 FHIR validator (%s), FHIR R4, offline; US Core 5.0.1: %d StructureDefinitions%n",
        versions(), engine.usCoreProfiles.size());
    out.printf("capture: %d lines with a resource, %d distinct validated (%d duplicates skipped)%s%s%n",
        capture.lines, capture.items.size(), capture.lines - capture.items.size(),
        capture.withoutResource > 0 ? ", " + capture.withoutResource + " lines without a resource" : "",
        capture.unreadable.isEmpty() ? "" : ", " + capture.unreadable.size() + " UNREADABLE lines");
    for (String u : capture.unreadable.subList(0, Math.min(10, capture.unreadable.size()))) out.println("  unreadable " + u);

    out.printf("%nresources validated: %d (%d top-level + %d inside Bundles)%n", topLevel + inBundles, topLevel, inBundles);
    for (Map.Entry<String, int[]> e : types.entrySet()) {
      int[] c = e.getValue();
      out.printf("  %-28s %6d  (%d top-level, %d in Bundles)%n", e.getKey(), c[0] + c[1], c[0], c[1]);
    }

    out.printf("%n== ERRORS: %d ==%n", errorCount());
    for (Group g : byCount(errors)) {
      out.printf("%n[%d, in %d distinct resources] %s: %s%n", g.count, distinct(g), g.messageId.isEmpty() ? "(no message id)" : g.messageId, g.template);
      for (Finding f : g.all) {
        out.printf("  - %s (%d) | %s | %s | %s%n", f.request(), f.status(), f.resource(), f.location(), f.message());
      }
    }

    out.printf("%n== ERRORS THE TEST DATA CARRIES AS SENT: %d (not the server's; each explained) ==%n",
        dataErrors.values().stream().mapToInt(g -> g.count).sum());
    for (Map.Entry<Known, Group> e : dataErrors.entrySet()) {
      Group g = e.getValue();
      out.printf("%n[%d, in %d distinct resources] %s: %s%n  why: %s%n  e.g. %s (%d) | %s | %s%n", g.count, distinct(g),
          g.messageId, g.template, e.getKey().why(), g.example.request(), g.example.status(), g.example.resource(),
          g.example.location());
    }

    out.printf("%n== WARNINGS: %d in %d kinds ==%n", sum(warnings), warnings.size());
    for (Group g : byCount(warnings)) printGroup(out, g);

    out.printf("%n== INFORMATION: %d in %d kinds ==%n", sum(information), information.size());
    for (Group g : byCount(information)) {
      out.printf("  %6d  %s: %s%n", g.count, g.messageId, g.template);
    }

    out.printf("%n== NOT CHECKABLE OFFLINE (not errors; listed so nothing is hidden) ==%n");
    long unavailable = claimed.keySet().stream().filter(p -> !available.get(p)).count();
    out.printf("claimed profiles (meta.profile) not available offline: %d, claimed by these many resources:%n", unavailable);
    claimed.forEach((p, n) -> {
      if (!available.get(p)) out.printf("  %6d  %s%n", n, p);
    });
    List<String> checked = claimed.keySet().stream().filter(available::get).map(p -> p + " ×" + claimed.get(p)).toList();
    if (!checked.isEmpty()) out.printf("  (claimed and checked: %s)%n", String.join(", ", checked));
    out.printf("  the validator's messages about them: %d%n", sum(profileMessages));
    for (Group g : byCount(profileMessages)) printGroup(out, g);
    out.printf("extensions without a definition offline: %d messages%n", sum(extensions));
    for (Group g : byCount(extensions)) printGroup(out, g);
    out.printf("terminology not checkable offline: %d messages%n", sum(terminology));
    for (Group g : byCount(terminology)) printGroup(out, g);

    out.printf("%nnetwork: %s%n", networkAttempts.isEmpty() ? "no access attempted"
        : networkAttempts.size() + " ATTEMPTS (blocked): " + networkAttempts.subList(0, Math.min(5, networkAttempts.size())));
    out.printf("time: startup %.1f s; validation %.1f s on %d threads (%.1f CPU s, %.1f ms CPU per resource): "
            + "%.0f resources/s (%.0f/s counting Bundle entries)%n",
        startupSeconds, validationSeconds, threads, validationCpuSeconds, 1000 * validationCpuSeconds / Math.max(1, topLevel),
        topLevel / validationSeconds, (topLevel + inBundles) / validationSeconds);
    out.printf("result: %s%n", errorCount() > 0 ? "FAIL, " + errorCount() + " errors" : "PASS, no errors");
  }

  /** Resources a group's messages were about, counting a Bundle entry as its own resource. */
  private static int distinct(Group g) {
    Set<String> ids = new HashSet<>();
    for (String r : g.resources) ids.add(r.contains(" > ") ? r.substring(r.indexOf(" > ") + 3) : r);
    return ids.size();
  }

  private static void printGroup(PrintStream out, Group g) {
    out.printf("  %6d  [%s] %s: %s  (%d distinct resources)%n", g.count, g.severity, g.messageId, g.template, distinct(g));
    if (!g.subjects.isEmpty()) {
      StringBuilder s = new StringBuilder();
      g.subjects.entrySet().stream().sorted(Map.Entry.<String, Integer>comparingByValue().reversed()).limit(8)
          .forEach(e -> s.append(s.length() == 0 ? "" : ", ").append(e.getKey()).append(" ×").append(e.getValue()));
      if (g.subjects.size() > 8) s.append(", … ").append(g.subjects.size() - 8).append(" more");
      out.printf("          about: %s%n", s);
    }
    Finding f = g.example;
    out.printf("          e.g. %s | %s | %s%n          %s%n", f.request(), f.resource(), f.location(), f.message());
  }

  ObjectNode toJson(ObjectMapper json) {
    ObjectNode root = json.createObjectNode();
    root.put("validator", versions());
    root.putArray("usCoreProfiles").addAll(engine.usCoreProfiles.stream().map(root::textNode).toList());
    ObjectNode c = root.putObject("capture");
    c.put("linesWithResource", capture.lines);
    c.put("distinctValidated", capture.items.size());
    c.put("duplicatesSkipped", capture.lines - capture.items.size());
    c.put("linesWithoutResource", capture.withoutResource);
    c.putArray("unreadable").addAll(capture.unreadable.stream().map(root::textNode).toList());
    ObjectNode t = root.putObject("resources");
    t.put("total", topLevel + inBundles);
    t.put("topLevel", topLevel);
    t.put("insideBundles", inBundles);
    ObjectNode byType = t.putObject("byType");
    types.forEach((k, v) -> byType.putObject(k).put("topLevel", v[0]).put("insideBundles", v[1]));

    root.put("errorCount", errorCount());
    ArrayNode errs = root.putArray("errors");
    for (Group g : byCount(errors)) for (Finding f : g.all) errs.add(json.valueToTree(f));
    root.put("warningCount", sum(warnings));
    root.set("warnings", groups(json, warnings));
    root.put("informationCount", sum(information));
    root.set("information", groups(json, information));

    ObjectNode nc = root.putObject("notCheckableOffline");
    ArrayNode profiles = nc.putArray("claimedProfiles");
    claimed.forEach((p, n) -> profiles.addObject().put("profile", p).put("resources", n).put("availableOffline", available.get(p)));
    nc.set("profileMessages", groups(json, profileMessages));
    nc.set("extensionMessages", groups(json, extensions));
    nc.set("terminologyMessages", groups(json, terminology));

    root.putArray("networkAttempts").addAll(networkAttempts.stream().map(root::textNode).toList());
    ObjectNode time = root.putObject("time");
    time.put("threads", threads);
    time.put("startupSeconds", startupSeconds);
    time.put("validationSeconds", validationSeconds);
    time.put("validationCpuSeconds", validationCpuSeconds);
    time.put("resourcesPerSecond", topLevel / validationSeconds);
    time.put("resourcesPerSecondWithBundleEntries", (topLevel + inBundles) / validationSeconds);
    return root;
  }

  private static ArrayNode groups(ObjectMapper json, Map<String, Group> m) {
    ArrayNode a = json.createArrayNode();
    for (Group g : byCount(m)) {
      ObjectNode o = a.addObject();
      o.put("count", g.count);
      o.put("severity", g.severity);
      o.put("messageId", g.messageId);
      o.put("message", g.template);
      o.put("distinctResources", distinct(g));
      if (!g.subjects.isEmpty()) {
        ObjectNode s = o.putObject("about");
        g.subjects.forEach(s::put);
      }
      o.set("example", json.valueToTree(g.example));
    }
    return a;
  }
}
