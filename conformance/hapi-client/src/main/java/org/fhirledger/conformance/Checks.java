package org.fhirledger.conformance;

import ca.uhn.fhir.rest.server.exceptions.BaseServerResponseException;
import java.util.List;
import java.util.Set;

/** Runs named checks, prints one PASS/FAIL/SKIP line each, and counts them. */
final class Checks {
  /** A check's body: returns the detail printed after PASS. */
  interface Body {
    String run() throws Exception;
  }

  /** Something that may throw, for {@link #expectThrows}. */
  interface Call {
    void run() throws Exception;
  }

  /** Thrown by a body that cannot apply (for example, a feature the server does not claim). */
  static final class Skipped extends RuntimeException {
    private static final long serialVersionUID = 1L;

    Skipped(String why) {
      super(why);
    }
  }

  private final List<HttpTrace> traces;
  private int passed;
  private int failed;
  private int skipped;

  Checks(List<HttpTrace> traces) {
    this.traces = traces;
  }

  void run(String name, Body body) {
    traces.forEach(HttpTrace::clear);
    try {
      String detail = body.run();
      passed++;
      print("PASS", name, detail);
    } catch (Skipped s) {
      skipped++;
      print("SKIP", name, s.getMessage());
    } catch (Throwable t) {
      failed++;
      StringBuilder detail = new StringBuilder(describe(t));
      // The last exchange makes a server-side failure reportable without re-running.
      for (HttpTrace trace : traces) {
        String last = trace.last();
        if (last != null) {
          detail.append("\n      last exchange: ").append(last);
        }
      }
      print("FAIL", name, detail.toString());
    }
  }

  int failed() {
    return failed;
  }

  String summary() {
    return passed + " passed, " + failed + " failed" + (skipped > 0 ? ", " + skipped + " skipped" : "");
  }

  private static void print(String verdict, String name, String detail) {
    String line = verdict + "  " + name;
    if (detail != null && !detail.isEmpty()) {
      line += ": " + detail;
    }
    System.out.println(line);
    System.out.flush();
  }

  // ---------------------------------------------------------------------------------------
  // Assertions

  static void expect(boolean condition, String message, Object... args) {
    if (!condition) {
      throw new AssertionError(args.length == 0 ? message : String.format(message, args));
    }
  }

  static <T> T require(T value, String what) {
    if (value == null) {
      throw new IllegalStateException(what + " is missing (an earlier check failed)");
    }
    return value;
  }

  /** Runs call and returns the exception of the wanted type that it must throw. */
  static <E extends Throwable> E expectThrows(Class<E> type, String what, Call call) {
    try {
      call.run();
    } catch (Throwable t) {
      if (type.isInstance(t)) {
        return type.cast(t);
      }
      throw new AssertionError(what + ": expected " + type.getSimpleName() + ", got " + describe(t), t);
    }
    throw new AssertionError(what + ": expected " + type.getSimpleName() + ", but the call succeeded");
  }

  /** Runs call, which must fail with one of the given HTTP statuses; returns that status. */
  static int expectStatus(Set<Integer> statuses, String what, Call call) {
    BaseServerResponseException e = expectThrows(BaseServerResponseException.class, what, call);
    expect(statuses.contains(e.getStatusCode()), "%s: expected HTTP %s, got %s", what, statuses, describe(e));
    return e.getStatusCode();
  }

  static String describe(Throwable t) {
    if (t instanceof BaseServerResponseException e) {
      String body = e.getResponseBody() == null ? "" : " body " + clip(e.getResponseBody(), 600);
      // HAPI's messages already begin with "HTTP <status> <reason>".
      String message = clip(e.getMessage(), 300);
      String status = message.startsWith("HTTP ") ? "" : "HTTP " + e.getStatusCode() + " ";
      return e.getClass().getSimpleName() + " " + status + message + body;
    }
    if (t instanceof AssertionError) {
      return t.getMessage();
    }
    return t.toString();
  }

  static String clip(String s, int max) {
    if (s == null) {
      return "";
    }
    String one = s.replaceAll("\\s+", " ").trim();
    return one.length() <= max ? one : one.substring(0, max) + "...";
  }
}
