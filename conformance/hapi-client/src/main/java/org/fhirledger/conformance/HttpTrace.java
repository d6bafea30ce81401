package org.fhirledger.conformance;

import ca.uhn.fhir.rest.client.api.IClientInterceptor;
import ca.uhn.fhir.rest.client.api.IHttpRequest;
import ca.uhn.fhir.rest.client.api.IHttpResponse;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

/**
 * Records what a HAPI client put on the wire (method, URL, headers) and the status it got, so a
 * check can assert on a header HAPI sends (If-Match, Accept) and a failure can name the exchange.
 */
final class HttpTrace implements IClientInterceptor {
  record Exchange(String method, String uri, Map<String, List<String>> headers, int status,
      Map<String, List<String>> responseHeaders) {
    /** A request header. */
    String header(String name) {
      return first(headers, name);
    }

    /** A response header (HAPI's exceptions do not carry them). */
    String responseHeader(String name) {
      return first(responseHeaders, name);
    }

    private static String first(Map<String, List<String>> headers, String name) {
      return headers.entrySet().stream()
          .filter(e -> e.getKey().equalsIgnoreCase(name))
          .flatMap(e -> e.getValue().stream())
          .findFirst()
          .orElse(null);
    }

    @Override
    public String toString() {
      return method + " " + uri + " -> " + (status == 0 ? "no response" : "HTTP " + status);
    }
  }

  private final List<Exchange> exchanges = new ArrayList<>();
  private IHttpRequest pending;

  @Override
  public synchronized void interceptRequest(IHttpRequest request) {
    flushPending(0, Map.of());
    pending = request;
  }

  @Override
  public synchronized void interceptResponse(IHttpResponse response) {
    flushPending(response.getStatus(), response.getAllHeaders());
  }

  private void flushPending(int status, Map<String, List<String>> responseHeaders) {
    if (pending != null) {
      exchanges.add(new Exchange(pending.getHttpVerbName(), pending.getUri(), pending.getAllHeaders(), status,
          responseHeaders));
      pending = null;
    }
  }

  synchronized void clear() {
    exchanges.clear();
    pending = null;
  }

  synchronized List<Exchange> exchanges() {
    flushPending(0, Map.of());
    return List.copyOf(exchanges);
  }

  synchronized String last() {
    if (pending != null) {
      return pending.getHttpVerbName() + " " + pending.getUri() + " -> no response";
    }
    return exchanges.isEmpty() ? null : exchanges.get(exchanges.size() - 1).toString();
  }

  /** The last request whose method is the given one. */
  synchronized Exchange lastOf(String method) {
    flushPending(0, Map.of());
    for (int i = exchanges.size() - 1; i >= 0; i--) {
      if (exchanges.get(i).method().equalsIgnoreCase(method)) {
        return exchanges.get(i);
      }
    }
    throw new AssertionError("no " + method + " request was recorded");
  }
}
