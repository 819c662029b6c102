//! Splitting the work on a large file over a few threads. A load or reload runs off the
//! request path, and the proxy keeps serving while it runs.

/// The maximum number of threads that work on one file.
const MAX_THREADS: usize = 4;

/// Calls `work` with the index of its first item and a chunk, for consecutive chunks of
/// `items`, and returns the results in order. The chunks run on up to `MAX_THREADS`
/// threads, each with at least `min_per_thread` items.
pub(super) fn map_chunks<T: Sync, R: Send>(
    items: &[T],
    min_per_thread: usize,
    work: impl Fn(usize, &[T]) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, MAX_THREADS);
    let per_thread = items.len().div_ceil(threads).max(min_per_thread).max(1);
    if items.len() <= per_thread {
        return vec![work(0, items)];
    }
    let work = &work;
    std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .chunks(per_thread)
            .enumerate()
            .map(|(number, chunk)| scope.spawn(move || work(number * per_thread, chunk)))
            .collect();
        workers
            .into_iter()
            // A panic in a worker is passed on as it is.
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_item_order() {
        let items: Vec<usize> = (0..10_000).collect();
        let chunks = map_chunks(&items, 1_000, |first, chunk| {
            assert_eq!(chunk[0], first);
            chunk.to_vec()
        });
        assert!(chunks.len() > 1);
        assert_eq!(chunks.concat(), items);
        assert_eq!(
            map_chunks(&[] as &[usize], 10, |_, chunk| chunk.len()),
            vec![0]
        );
    }
}
