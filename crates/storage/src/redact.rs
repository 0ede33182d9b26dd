//! Keeping secrets out of messages.
//!
//! Error texts from HTTP clients embed request URLs and sometimes the server's XML error
//! body. A URL may carry a user:password or a signed query (SAS tokens, presigned
//! signatures); an S3 error body echoes the canonical request. Everything that ends up in a
//! [`crate::StorageError`] message from an object store goes through [`redact_text`].

/// Returns `url` with any `user:password@` part and every query value removed, so it can
/// appear in messages and logs. Works on strings that are not valid URLs too.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    // The authority ends at the first '/', '?' or '#'.
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => format!("<redacted>@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    let tail = match tail.find('?') {
        Some(q) => {
            let (path, query) = tail.split_at(q);
            let keys: Vec<String> = query[1..]
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| format!("{}=<redacted>", p.split('=').next().unwrap_or("")))
                .collect();
            format!("{path}?{}", keys.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}{authority}{tail}")
}

/// Redacts every URL inside free text (see [`redact_url`]) and shrinks an XML error body
/// to its `<Code>` and `<Message>`, dropping echoed canonical requests and key ids.
pub(crate) fn redact_text(text: &str) -> String {
    let text = shrink_xml_error(text);
    let mut out = String::with_capacity(text.len());
    for (i, token) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if token.contains("://") {
            out.push_str(&redact_url(token));
        } else {
            out.push_str(token);
        }
    }
    out
}

fn xml_field<'a>(text: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&close)? + start;
    Some(&text[start..end])
}

fn shrink_xml_error(text: &str) -> String {
    let Some(xml_start) = text.find("<?xml").or_else(|| text.find("<Error>")) else {
        return text.to_owned();
    };
    let code = xml_field(text, "Code").unwrap_or("unknown");
    let message = xml_field(text, "Message").unwrap_or("");
    format!("{}[server error {code}: {message}]", &text[..xml_start])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_userinfo_and_query_values() {
        assert_eq!(
            redact_url("s3://AKIA:hunter2@bucket/p?sig=abc&x=1"),
            "s3://<redacted>@bucket/p?sig=<redacted>&x=<redacted>"
        );
        assert_eq!(redact_url("/plain/path"), "/plain/path");
        assert_eq!(redact_url("http://h:1/a/b"), "http://h:1/a/b");
    }

    #[test]
    fn shrinks_xml_bodies() {
        let t = "PUT failed: <?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>\
                 <Message>nope</Message><CanonicalRequest>secretish</CanonicalRequest></Error>";
        let r = redact_text(t);
        assert!(
            r.contains("SignatureDoesNotMatch") && r.contains("nope"),
            "{r}"
        );
        assert!(!r.contains("secretish"), "{r}");
    }
}
