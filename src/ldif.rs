//! stub until the LDIF module lands
#![allow(missing_docs)]
pub fn write_value(out: &mut String, attr: &str, value: &str) {
    out.push_str(&format!("{attr}: {value}\n"));
}
