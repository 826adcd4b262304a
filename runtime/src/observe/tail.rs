//! Live tails of functions (`GET /functions/{name}/tail`, `outpost tail NAME`): every access
//! record and console line of one function, as JSON lines, while someone follows it.
//!
//! [`TailLayer`] is a `tracing` layer beside the log's own: it sees the access records
//! (`outpost::access`) and console output (`outpost::console`) whatever the log level, and
//! while nobody follows a tail it returns at once. Each follower gets a
//! [`broadcast`](tokio::sync::broadcast) receiver; one that falls behind is told how many
//! lines it missed.

use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};

/// Lines a slow follower may fall behind before it misses some.
const BACKLOG: usize = 1024;

/// One line of a tail: the function it belongs to and the event as a JSON object.
#[derive(Debug, Clone)]
pub struct TailLine {
  pub function: Arc<str>,
  pub json: Arc<str>,
}

/// Where tails are followed from; made once per process and given to both the log
/// ([`Tails::layer`]) and the node.
#[derive(Debug, Clone)]
pub struct Tails {
  sender: broadcast::Sender<TailLine>,
}

impl Default for Tails {
  fn default() -> Self {
    Tails {
      sender: broadcast::channel(BACKLOG).0,
    }
  }
}

impl Tails {
  /// Follows every function's lines; the caller keeps those of the function it tails.
  pub fn follow(&self) -> broadcast::Receiver<TailLine> {
    self.sender.subscribe()
  }

  /// The `tracing` layer that feeds the tails, with its filter: it takes access records
  /// and console output while someone follows a tail, and nothing else, so that an event
  /// the log does not record either is not even built.
  pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
  where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
  {
    use tracing_subscriber::Layer as _;
    let sender = self.sender.clone();
    let filter = tracing_subscriber::filter::DynFilterFn::new(move |metadata, _| {
      tail_kind(metadata).is_some() && sender.receiver_count() > 0
    })
    .with_callsite_filter(|metadata| {
      if tail_kind(metadata).is_some() {
        tracing::subscriber::Interest::sometimes()
      } else {
        tracing::subscriber::Interest::never()
      }
    });
    TailLayer {
      sender: self.sender.clone(),
    }
    .with_filter(filter)
  }
}

/// What tails show an event as (`access` or `console`), or `None` for events they skip.
fn tail_kind(metadata: &tracing::Metadata<'_>) -> Option<&'static str> {
  match metadata.target() {
    "outpost::access" => Some("access"),
    "outpost::console" => Some("console"),
    _ => None,
  }
}

/// See the module docs.
pub struct TailLayer {
  sender: broadcast::Sender<TailLine>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for TailLayer {
  /// Events reach this layer through the filter of [`Tails::layer`]: tailed kinds, while
  /// someone follows a tail.
  fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
    let Some(kind) = tail_kind(event.metadata()) else {
      return;
    };
    let mut fields = JsonFields(Map::new());
    event.record(&mut fields);
    let mut object = fields.0;
    let Some(function) = object
      .get("function")
      .and_then(Value::as_str)
      .map(Arc::<str>::from)
    else {
      return;
    };
    object.insert("kind".into(), kind.into());
    object.insert(
      "level".into(),
      event.metadata().level().as_str().to_lowercase().into(),
    );
    object.insert(
      "time".into(),
      httpdate::fmt_http_date(std::time::SystemTime::now()).into(),
    );
    let json = Value::Object(object).to_string().into();
    // No receiver left between the check and now is fine: the line is for nobody.
    let _ = self.sender.send(TailLine { function, json });
  }
}

/// Records an event's fields as JSON values.
struct JsonFields(Map<String, Value>);

impl Visit for JsonFields {
  fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
    self
      .0
      .insert(field.name().into(), format!("{value:?}").into());
  }

  fn record_str(&mut self, field: &Field, value: &str) {
    self.0.insert(field.name().into(), value.into());
  }

  fn record_u64(&mut self, field: &Field, value: u64) {
    self.0.insert(field.name().into(), value.into());
  }

  fn record_i64(&mut self, field: &Field, value: i64) {
    self.0.insert(field.name().into(), value.into());
  }

  fn record_f64(&mut self, field: &Field, value: f64) {
    self.0.insert(field.name().into(), value.into());
  }

  fn record_bool(&mut self, field: &Field, value: bool) {
    self.0.insert(field.name().into(), value.into());
  }
}
