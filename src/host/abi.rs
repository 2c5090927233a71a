//! The proxy-wasm calls of a stream, without the SDK's panics. The SDK (0.2.5) panics
//! on any status it does not expect (`get_map_bytes`, `set_map_value`,
//! `send_http_response`, `resume_http_*`, `set_property`, `set_buffer`…) and decodes
//! header names with `unwrap`; a panic takes the whole VM down and answers 503 to
//! every agent on that worker. These wrappers declare the same host functions and
//! return every status as a value. Header values stay bytes end to end.

use std::ptr::{null, null_mut};

use proxy_wasm::types::{BufferType, MapType, Status, StreamType};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> Status;
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *mut *mut u8,
        value_size: *mut usize,
    ) -> Status;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_remove_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
    ) -> Status;
    fn proxy_get_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        max_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> Status;
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
    fn proxy_continue_stream(stream_type: StreamType) -> Status;
    fn proxy_set_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> Status;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
}

fn result(status: Status) -> Result<(), Status> {
    match status {
        Status::Ok => Ok(()),
        other => Err(other),
    }
}

/// Takes ownership of memory the host allocated through the module's allocator.
///
/// # Safety
/// `data` must be null or point to `size` bytes the host allocated with
/// `proxy_on_memory_allocate` (exported by the SDK) for this call's result.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// A header map as the host encoded it, read in one call; headers are looked up in
/// place (no copy per header).
pub struct HeaderMap {
    raw: Vec<u8>,
    /// (name start, name end, value start, value end) in `raw`.
    spans: Vec<[u32; 4]>,
}

impl HeaderMap {
    /// Reads a whole map (empty when the host has none or it cannot be decoded).
    pub fn read(map: MapType) -> HeaderMap {
        let mut data = null_mut();
        let mut size = 0;
        // SAFETY: the host writes a pointer and size it allocated for this call.
        let raw = unsafe {
            match proxy_get_header_map_pairs(map, &mut data, &mut size) {
                Status::Ok => owned(data, size),
                _ => Vec::new(),
            }
        };
        let spans = crate::core::pairs::spans(&raw).unwrap_or_default();
        HeaderMap { raw, spans }
    }

    fn slice(&self, from: u32, to: u32) -> &[u8] {
        self.raw.get(from as usize..to as usize).unwrap_or_default()
    }

    /// Every header, in order, as (name, value) bytes.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans
            .iter()
            .map(|[a, b, c, d]| (self.slice(*a, *b), self.slice(*c, *d)))
    }

    /// The values of a header (names compared by length first: most differ there).
    fn values<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        let wanted = name.as_bytes();
        self.spans
            .iter()
            .filter(move |[a, b, _, _]| {
                (b - a) as usize == wanted.len() && self.slice(*a, *b) == wanted
            })
            .map(|[_, _, c, d]| self.slice(*c, *d))
    }

    /// The first value of a header.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.values(name).next()
    }

    /// A header as the firewall sees it: missing, sent once, or sent more than once.
    pub fn lookup(&self, name: &str) -> crate::core::call::HeaderValue {
        use crate::core::call::HeaderValue;
        let mut found = self.values(name);
        match (found.next(), found.next()) {
            (None, _) => HeaderValue::Missing,
            (Some(value), None) => HeaderValue::One(value.to_vec()),
            (Some(_), Some(_)) => HeaderValue::Many,
        }
    }
}

/// One header's value, as bytes; `None` when absent.
pub fn map_value(map: MapType, name: &str) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: as in `map_pairs`.
    unsafe {
        match proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) {
            Status::Ok => Some(owned(data, size)),
            _ => None,
        }
    }
}

/// Sets a header (replacing any value it had).
pub fn set_header(map: MapType, name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: pointers and lengths of live slices.
    result(unsafe {
        proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    })
}

pub fn remove_header(map: MapType, name: &str) -> Result<(), Status> {
    // SAFETY: pointer and length of a live slice.
    result(unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) })
}

/// `size` bytes of a body buffer from `start` (empty when there is none).
pub fn buffer(kind: BufferType, start: usize, size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    let mut data = null_mut();
    let mut got = 0;
    // SAFETY: as in `map_pairs`.
    unsafe {
        match proxy_get_buffer_bytes(kind, start, size, &mut data, &mut got) {
            Status::Ok => owned(data, got),
            _ => Vec::new(),
        }
    }
}

/// Replaces `size` bytes of a buffer from `start` with `data` (`0` and the buffer's
/// length: all of it, as when a held request body is rewritten).
pub fn set_buffer(kind: BufferType, start: usize, size: usize, data: &[u8]) -> Result<(), Status> {
    // SAFETY: pointer and length of a live slice.
    result(unsafe { proxy_set_buffer_bytes(kind, start, size, data.as_ptr(), data.len()) })
}

/// Answers the stream locally (status, headers as bytes, body).
pub fn send_local(status: u32, headers: &[(&str, &[u8])], body: &[u8]) -> Result<(), Status> {
    let map = crate::core::pairs::encode(headers);
    // SAFETY: pointers and lengths of live buffers; no details, no gRPC status.
    result(unsafe {
        proxy_send_local_response(
            status,
            null(),
            0,
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    })
}

/// Resumes a paused request (or response).
pub fn resume(request: bool) -> Result<(), Status> {
    let kind = if request {
        StreamType::HttpRequest
    } else {
        StreamType::HttpResponse
    };
    // SAFETY: no pointers.
    result(unsafe { proxy_continue_stream(kind) })
}

/// Sets a filter-state property (for access logs).
pub fn set_property(name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: pointers and lengths of live slices.
    result(unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}
