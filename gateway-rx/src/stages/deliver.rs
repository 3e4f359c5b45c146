//! The deliver stage: a small tokio runtime that pushes complete images to
//! the registry and exports them to the OCI layout, woken by the image
//! ledger when an image completes.

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

use crate::blobs::BlobStore;
use crate::config::RxConfig;
use crate::delivery::{Delivery, DeliveryQueue, DeliveryStats, Notifier};
use crate::status::Counters;

/// How long a delivery under way may take to end at shutdown.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The running delivery.
pub struct DeliverStage {
    runtime: tokio::runtime::Runtime,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<DeliveryStats>,
    delivery: Arc<Delivery>,
}

/// Changes the running delivery's webhook (a configuration reload).
#[derive(Clone)]
pub struct WebhookSwitch {
    runtime: tokio::runtime::Handle,
    delivery: Arc<Delivery>,
}

impl WebhookSwitch {
    /// Posts to `config`'s `[notify]` webhook from now on.
    pub fn apply(&self, config: &RxConfig) -> Result<(), crate::delivery::DeliveryError> {
        let _entered = self.runtime.enter();
        self.delivery.set_webhook(&config.notify)
    }

    /// Checks signatures before a push under `config`'s
    /// `[delivery] verify_signatures` from the next attempt on.
    pub fn apply_signature_keys(
        &self,
        config: &RxConfig,
    ) -> Result<(), crate::config::ConfigError> {
        self.delivery.set_signature_keys(config.signature_keys()?);
        Ok(())
    }

    /// The webhook's queue as it is now (other stages' events follow a
    /// reload this way).
    pub fn current(&self) -> Option<Notifier> {
        self.delivery.notifier()
    }
}

impl DeliverStage {
    pub fn start(
        config: &RxConfig,
        queue: DeliveryQueue,
        blobs: BlobStore,
        counters: Arc<Counters>,
        wake: Arc<Notify>,
    ) -> anyhow::Result<DeliverStage> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rx-delivery")
            .enable_all()
            .build()
            .context("starting the delivery runtime")?;
        let delivery = {
            let _entered = runtime.enter();
            Arc::new(
                Delivery::from_config(config, queue, blobs, counters)
                    .context("setting up delivery")?,
            )
        };
        let (stop, stopped) = watch::channel(false);
        let stats = delivery.stats();
        let task = runtime.spawn({
            let delivery = delivery.clone();
            async move { delivery.run(wake, stopped).await }
        });
        Ok(DeliverStage {
            runtime,
            stop,
            task,
            stats,
            delivery,
        })
    }

    /// Attempts, failures and push durations per target, for the metrics.
    pub fn stats(&self) -> Arc<DeliveryStats> {
        self.stats.clone()
    }

    /// What a reload changes the webhook through.
    pub fn webhook_switch(&self) -> WebhookSwitch {
        WebhookSwitch {
            runtime: self.runtime.handle().clone(),
            delivery: self.delivery.clone(),
        }
    }

    /// Asks delivery to stop starting work; it ends what is under way.
    pub fn ask_to_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits (bounded) for delivery to end, then stops the runtime.
    pub fn stop(self) {
        let task = self.task;
        let _ = self
            .runtime
            .block_on(async { tokio::time::timeout(STOP_WAIT, task).await });
        self.runtime.shutdown_timeout(Duration::from_secs(2));
    }
}
