"""The guard's side of the conversation with vLLM: the request path's HTTP/1.1 client
(`h1client`), the connections and header allowlists (`connections`), and the engine monitor
that reads vLLM's /metrics (`monitor`)."""
