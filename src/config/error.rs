//! Configuration errors. Each names the file, line, campaign, field and value, and what
//! to do about it, so an operator can fix a file without reading keygate's code.

use std::fmt;
use std::ops::Range;

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// The 1-based line of the offending value.
    pub line: usize,
    pub campaign: Option<String>,
    /// The field path, such as `campaigns[2].allowed_ips[0]`.
    pub field: String,
    pub value: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if let Some(campaign) = &self.campaign {
            write!(f, "campaign \"{}\": ", campaign.escape_debug())?;
        }
        if !self.field.is_empty() {
            write!(f, "{}", self.field)?;
            if let Some(value) = &self.value {
                write!(f, " = \"{}\"", value.escape_debug())?;
            }
            write!(f, ": ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// Every problem found in one file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// The reason a configuration file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("failed to read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(ConfigErrors),
}

/// The name of a configuration file, with the offsets where the lines of its text start.
pub(super) struct Source {
    pub path: String,
    line_starts: Vec<usize>,
}

impl Source {
    pub fn new(path: &str, text: &str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(memchr::memchr_iter(b'\n', text.as_bytes()).map(|at| at + 1))
            .collect();
        Self {
            path: path.to_owned(),
            line_starts,
        }
    }

    /// Returns the 1-based line that contains the byte at `offset`.
    pub fn line(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset)
    }
}

/// Collects errors while a file is validated.
pub(super) struct Report<'s> {
    source: &'s Source,
    pub errors: Vec<ConfigError>,
}

impl<'s> Report<'s> {
    pub fn new(source: &'s Source) -> Self {
        Self::with_errors(source, Vec::new())
    }

    /// Continues a report with the errors already found in the same file.
    pub fn with_errors(source: &'s Source, errors: Vec<ConfigError>) -> Self {
        Self { source, errors }
    }

    /// Returns the 1-based line that contains the byte at `offset`.
    pub fn line(&self, offset: usize) -> usize {
        self.source.line(offset)
    }

    /// Records an error at `span` of the file.
    pub fn error(
        &mut self,
        span: Range<usize>,
        campaign: Option<&str>,
        field: impl Into<String>,
        value: Option<&str>,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            file: self.source.path.clone(),
            line: self.source.line(span.start),
            campaign: campaign.map(str::to_owned),
            field: field.into(),
            value: value.map(str::to_owned),
            message: message.into(),
        });
    }
}
