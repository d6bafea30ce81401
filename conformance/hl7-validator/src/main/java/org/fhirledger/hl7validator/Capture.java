package org.fhirledger.hl7validator;

import com.fasterxml.jackson.core.JsonFactory;
import com.fasterxml.jackson.core.JsonParser;
import com.fasterxml.jackson.core.JsonToken;
import java.io.BufferedReader;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * Reads a recording proxy's capture: one {"request", "status", "resource"} object per line.
 *
 * <p>The resource is kept as the exact text the recorder wrote (a span of the line), not a
 * re-serialization, so the validator's JSON checks (property names, types, duplicates) see what
 * the client saw. Identical resources are validated once; the first request that returned one
 * stands for all of them.
 */
final class Capture {
  /** One distinct resource to validate. */
  static final class Item {
    final String request;
    final int status;
    final String json;
    /** Lines of the capture that carried exactly this resource. */
    int seen = 1;

    Item(String request, int status, String json) {
      this.request = request;
      this.status = status;
      this.json = json;
    }
  }

  final List<Item> items = new ArrayList<>();
  /** Lines that held a resource (before de-duplication). */
  int lines;
  int withoutResource;
  final List<String> unreadable = new ArrayList<>();

  private static final JsonFactory JSON = new JsonFactory();

  static Capture read(Path file) throws IOException {
    Capture c = new Capture();
    Map<String, Item> byHash = new HashMap<>();
    try (BufferedReader in = Files.newBufferedReader(file, StandardCharsets.UTF_8)) {
      String line;
      int no = 0;
      while ((line = in.readLine()) != null) {
        no++;
        if (line.isBlank()) continue;
        Entry e;
        try {
          e = parse(line);
        } catch (IOException | RuntimeException ex) {
          c.unreadable.add("line " + no + ": " + ex.getMessage().lines().findFirst().orElse(""));
          continue;
        }
        if (e.resource == null) {
          c.withoutResource++;
          continue;
        }
        c.lines++;
        String hash = sha256(e.resource);
        Item known = byHash.get(hash);
        if (known != null) {
          known.seen++;
        } else {
          Item item = new Item(e.request, e.status, e.resource);
          byHash.put(hash, item);
          c.items.add(item);
        }
      }
    }
    return c;
  }

  private record Entry(String request, int status, String resource) {}

  /** Streams one line, cutting the "resource" object out by character offsets. */
  private static Entry parse(String line) throws IOException {
    String request = "?";
    int status = 0;
    String resource = null;
    try (JsonParser p = JSON.createParser(line)) {
      if (p.nextToken() != JsonToken.START_OBJECT) throw new IOException("not a JSON object");
      while (p.nextToken() == JsonToken.FIELD_NAME) {
        String name = p.currentName();
        JsonToken t = p.nextToken();
        switch (name) {
          case "request" -> request = p.getValueAsString("?");
          case "status" -> status = p.getValueAsInt(0);
          case "resource" -> {
            if (t == JsonToken.START_OBJECT) {
              int start = (int) p.currentTokenLocation().getCharOffset();
              p.skipChildren();
              int end = (int) p.currentLocation().getCharOffset();
              resource = line.substring(start, end);
            }
          }
          default -> p.skipChildren();
        }
      }
    }
    return new Entry(request, status, resource);
  }

  private static String sha256(String s) {
    try {
      MessageDigest md = MessageDigest.getInstance("SHA-256");
      return HexFormat.of().formatHex(md.digest(s.getBytes(StandardCharsets.UTF_8)));
    } catch (NoSuchAlgorithmException e) {
      throw new IllegalStateException(e);
    }
  }
}
