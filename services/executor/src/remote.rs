//! The in-process step kinds that call out over HTTP: `http` (one request, success by status)
//! and `llm` (an OpenAI-compatible chat completion that waits out rate limits and quota answers
//! until the step's deadline). Secret references (`${{ secrets.NAME }}`) are filled in here,
//! at the last moment; every value that comes back is masked before it is kept or logged.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use taskmesh_events::command::LogStream;
use taskmesh_events::expr::render_secrets;
use taskmesh_events::workflow::{HttpStep, LlmStep};

use taskmesh_egress::{error_chain, retry_after};

use crate::step::{Done, StepContext};

/// Longest wait between LLM retries when the server does not say.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Most bytes of an LLM response read.
const LLM_RESPONSE_LIMIT: usize = 4 * 1024 * 1024;

/// Fills in secret references in every string of a JSON value.
fn render_json(value: &mut serde_json::Value, secrets: &[(String, String)]) -> Result<(), String> {
    match value {
        serde_json::Value::String(s) => *s = render_secrets(s, secrets)?,
        serde_json::Value::Array(items) => items.iter_mut().try_for_each(|v| render_json(v, secrets))?,
        serde_json::Value::Object(map) => map.values_mut().try_for_each(|v| render_json(v, secrets))?,
        _ => {}
    }
    Ok(())
}

/// Reads at most `limit` bytes of a body: (bytes, truncated).
async fn bounded_body(mut response: reqwest::Response, limit: usize) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

fn headers(given: &std::collections::BTreeMap<String, String>, ctx: &StepContext) -> Result<HeaderMap, String> {
    let mut out = HeaderMap::new();
    for (name, value) in given {
        let value = render_secrets(value, &ctx.secrets)?;
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("'{name}' is not a header name"))?;
        let mut value =
            HeaderValue::from_str(&value).map_err(|_| format!("header {name} has a value HTTP cannot carry"))?;
        value.set_sensitive(true);
        out.insert(name, value);
    }
    Ok(out)
}

/// One HTTP request. Outputs: `status`, `headers` (a JSON object, lower-case names) and `body`
/// (at most `max_body_bytes`, marked truncated beyond). A status outside `success` fails the
/// step, with the server's `Retry-After` for the retry policy.
pub async fn http(h: &HttpStep, ctx: &StepContext) -> Done {
    match try_http(h, ctx).await {
        Ok(done) => done,
        Err(e) => Done::failed(ctx.mask(&e)),
    }
}

async fn try_http(h: &HttpStep, ctx: &StepContext) -> Result<Done, String> {
    let url = render_secrets(&h.url, &ctx.secrets)?;
    let url = reqwest::Url::parse(&url).map_err(|e| format!("'{}' is not a URL: {e}", ctx.mask(&url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("'{}' is not an http:// or https:// URL", ctx.mask(url.as_str())));
    }
    ctx.runtime.egress.check_url(&url).map_err(|d| d.to_string())?;
    let method = reqwest::Method::from_bytes(h.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("'{}' is not an HTTP method", h.method))?;
    let mut request = ctx.runtime.http.request(method.clone(), url.clone()).headers(headers(&h.headers, ctx)?);
    match &h.body {
        None => {}
        Some(serde_json::Value::String(text)) => request = request.body(render_secrets(text, &ctx.secrets)?),
        Some(value) => {
            let mut value = value.clone();
            render_json(&mut value, &ctx.secrets)?;
            request = request.json(&value);
        }
    }
    let shown = ctx.mask(url.as_str());
    ctx.log(LogStream::System, &format!("{method} {shown}"));
    let started = std::time::Instant::now();
    let response = request.send().await.map_err(|e| format!("{method} {shown}: {}", error_chain(&e)))?;
    let status = response.status().as_u16();
    let wait = retry_after(response.headers());
    let mut header_json = serde_json::Map::new();
    for (name, value) in response.headers() {
        header_json.insert(
            name.as_str().to_string(),
            serde_json::Value::String(ctx.mask(&String::from_utf8_lossy(value.as_bytes()))),
        );
    }
    let limit = h.max_body_bytes.unwrap_or(HttpStep::DEFAULT_BODY_BYTES).min(ctx.output_limit.max(1));
    let (body, truncated) =
        bounded_body(response, limit).await.map_err(|e| format!("reading the response: {}", error_chain(&e)))?;
    let body = String::from_utf8_lossy(&body);
    let body = if truncated { ctx.mask_cut(&body) } else { ctx.mask(&body) };
    ctx.log(LogStream::System, &format!("HTTP {status} in {} ms, {} bytes", started.elapsed().as_millis(), body.len()));
    for line in body.lines() {
        ctx.log(LogStream::Stdout, line);
    }
    let ok = h.succeeds(status);
    let mut outputs = std::collections::BTreeMap::new();
    outputs.insert("status".to_string(), status.to_string());
    outputs.insert("headers".to_string(), serde_json::Value::Object(header_json).to_string());
    outputs.insert("body".to_string(), body.clone());
    Ok(Done {
        ok,
        output: body,
        output_truncated: truncated,
        error: (!ok).then(|| format!("HTTP {status} is not a success status of this step")),
        outputs,
        retry_after_ms: if ok { None } else { wait.map(|d| d.as_millis() as u64) },
        ..Default::default()
    })
}

/// One chat completion. Outputs: `reply`, `finish_reason`, `model`, `prompt_tokens`,
/// `completion_tokens`, `total_tokens`. 429 and 503 answers (rate limits, quota) are waited out
/// with `Retry-After` or a capped exponential backoff; the step's deadline ends the wait.
pub async fn llm(l: &LlmStep, ctx: &StepContext) -> Done {
    match try_llm(l, ctx).await {
        Ok(done) => done,
        Err(e) => Done::failed(ctx.mask(&e)),
    }
}

async fn try_llm(l: &LlmStep, ctx: &StepContext) -> Result<Done, String> {
    let base = render_secrets(&l.base_url, &ctx.secrets)?;
    let url = format!("{}/chat/completions", base.trim_end_matches('/'));
    let url = reqwest::Url::parse(&url).map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    ctx.runtime.egress.check_url(&url).map_err(|d| d.to_string())?;
    let key = match &l.api_key_secret {
        Some(name) => Some(
            ctx.secrets
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| format!("secret {name} was not opened for this step"))?,
        ),
        None => None,
    };
    let mut messages = Vec::new();
    if let Some(system) = &l.system {
        messages.push(serde_json::json!({"role": "system", "content": render_secrets(system, &ctx.secrets)?}));
    }
    messages.push(serde_json::json!({"role": "user", "content": render_secrets(&l.prompt, &ctx.secrets)?}));
    let mut body = serde_json::json!({"model": l.model, "messages": messages});
    if let Some(t) = l.temperature {
        body["temperature"] = t.into();
    }
    if let Some(m) = l.max_tokens {
        body["max_tokens"] = m.into();
    }
    let mut backoff = Duration::from_secs(1);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let mut request = ctx.runtime.http.post(url.clone()).json(&body);
        if let Some(key) = &key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| format!("POST {url}: {}", error_chain(&e)))?;
        let status = response.status().as_u16();
        let wait = retry_after(response.headers());
        let (bytes, truncated) = bounded_body(response, LLM_RESPONSE_LIMIT)
            .await
            .map_err(|e| format!("reading the reply: {}", error_chain(&e)))?;
        let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
        let message = json
            .as_ref()
            .and_then(|j| j.pointer("/error/message").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned());
        if status == 429 || status == 503 {
            // A rate limit or an exhausted quota: wait, never fail for it (the deadline ends it).
            let delay = wait.unwrap_or_else(|| {
                let d = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                d.mul_f64(0.5 + rand::random::<f64>() / 2.0)
            });
            ctx.log(
                LogStream::System,
                &format!("HTTP {status} (try {tries}): {message}; waiting {} ms", delay.as_millis()),
            );
            tokio::time::sleep(delay).await;
            continue;
        }
        if !(200..300).contains(&status) {
            return Err(format!("HTTP {status} from {url}: {message}"));
        }
        if truncated {
            return Err(format!("the reply is over {LLM_RESPONSE_LIMIT} bytes"));
        }
        let json = json.ok_or("the reply is not JSON")?;
        let choice = json.pointer("/choices/0").ok_or("the reply has no choices")?;
        let reply = choice.pointer("/message/content").and_then(|c| c.as_str()).unwrap_or_default();
        let reply = ctx.mask(reply);
        for line in reply.lines() {
            ctx.log(LogStream::Stdout, line);
        }
        let mut output = reply;
        let cut = output.len() > ctx.output_limit;
        taskmesh_events::truncate_at_char(&mut output, ctx.output_limit);
        // The reply output is bounded like the step's output.
        let mut outputs = std::collections::BTreeMap::new();
        outputs.insert("reply".to_string(), output.clone());
        if let Some(f) = choice.get("finish_reason").and_then(|f| f.as_str()) {
            outputs.insert("finish_reason".into(), f.into());
        }
        if let Some(m) = json.get("model").and_then(|m| m.as_str()) {
            outputs.insert("model".into(), m.into());
        }
        for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            if let Some(n) = json.pointer(&format!("/usage/{field}")).and_then(|n| n.as_u64()) {
                outputs.insert(field.into(), n.to_string());
            }
        }
        return Ok(Done { ok: true, output, output_truncated: cut, outputs, ..Default::default() });
    }
}
