//! A FHIRPath subset, enough for every R4 and US Core SearchParameter expression: paths with
//! choice types, `|`, `where()`, `as`/`as()`/`ofType()`, `is`, `resolve()` (only as a type
//! test on references), `extension('url')`, `exists()`, `first()`, `[n]`, `=`, `!=`, `and`,
//! `or`, `not()`. Evaluation tracks each node's FHIR type through the StructureDefinitions, so
//! value extraction knows a HumanName from an Address without guessing from the JSON shape.

use crate::fhir::json::Json;
use crate::fhir::profiles::Profiles;

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// The evaluation context (`$this`, or the resource at the top).
    This,
    /// An identifier starting with a capital letter in term position: a type test on the
    /// context (`Observation` keeps an Observation, drops anything else).
    TypeName(String),
    Child(Box<Expr>, String),
    Index(Box<Expr>, usize),
    Union(Box<Expr>, Box<Expr>),
    As(Box<Expr>, String),
    Is(Box<Expr>, String),
    Where(Box<Expr>, Box<Expr>),
    Call(Box<Expr>, Func),
    Eq(Box<Expr>, Box<Expr>, bool),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Str(String),
    Bool(bool),
    Num(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Func {
    Resolve,
    Exists,
    Empty,
    Not,
    First,
    Extension(String),
}

/// One value during evaluation.
#[derive(Clone, Debug)]
pub enum Item<'a> {
    /// A JSON node with its FHIR type (a type name, or an element path for backbone elements)
    /// when known.
    Node(&'a Json, Option<String>),
    Bool(bool),
    /// What `resolve()` yields: the type a reference points at (nothing else is known).
    Resolved(String),
    /// A string literal of the expression.
    Str(String),
}

impl Item<'_> {
    pub fn ty(&self) -> Option<&str> {
        match self {
            Item::Node(_, t) => t.as_deref(),
            Item::Bool(_) => Some("boolean"),
            Item::Resolved(t) => Some(t),
            Item::Str(_) => Some("string"),
        }
    }
}

// ---------------------------------------------------------------- parsing

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Sym(&'static str),
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == '$' || c == '%' {
            let s = i;
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(src[s..i].to_string()));
        } else if c == '`' {
            let s = i + 1;
            let e = src[s..].find('`').ok_or("unterminated `identifier`")? + s;
            out.push(Tok::Ident(src[s..e].to_string()));
            i = e + 1;
        } else if c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err("unterminated string".into()),
                    Some(b'\'') => break,
                    Some(b'\\') => {
                        let next = src[i + 1..].chars().next().ok_or("unterminated string")?;
                        s.push(match next {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                        i += 1 + next.len_utf8();
                    }
                    Some(_) => {
                        let ch = src[i..].chars().next().ok_or("bad string")?;
                        s.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            i += 1;
            out.push(Tok::Str(s));
        } else if c.is_ascii_digit() {
            let s = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            out.push(Tok::Num(src[s..i].to_string()));
        } else {
            let sym = match (c, b.get(i + 1).map(|&x| x as char)) {
                ('!', Some('=')) => "!=",
                ('.', _) => ".",
                ('(', _) => "(",
                (')', _) => ")",
                ('[', _) => "[",
                (']', _) => "]",
                ('|', _) => "|",
                ('=', _) => "=",
                (',', _) => ",",
                _ => return Err(format!("unexpected character {c:?}")),
            };
            i += sym.len();
            out.push(Tok::Sym(sym));
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

/// Parses a FHIRPath expression of the supported subset.
pub fn parse(src: &str) -> Result<Expr, String> {
    let mut p = Parser { toks: lex(src)?, pos: 0 };
    let e = p.or()?;
    if p.pos != p.toks.len() {
        return Err(format!("unexpected {:?}", p.toks[p.pos]));
    }
    Ok(e)
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn eat_sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(x)) if *x == s) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn eat_word(&mut self, w: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(x)) if x == w) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect_sym(&mut self, s: &str) -> Result<(), String> {
        if self.eat_sym(s) {
            Ok(())
        } else {
            Err(format!("expected {s:?}"))
        }
    }
    fn ident(&mut self) -> Result<String, String> {
        match self.toks.get(self.pos).cloned() {
            Some(Tok::Ident(s)) => {
                self.pos += 1;
                Ok(s)
            }
            other => Err(format!("expected a name, found {other:?}")),
        }
    }
    /// A type specifier, possibly qualified (`FHIR.Quantity`, `System.String`).
    fn type_name(&mut self) -> Result<String, String> {
        let mut name = self.ident()?;
        while self.eat_sym(".") {
            name = self.ident()?;
        }
        Ok(name)
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.eat_word("or") {
            l = Expr::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.equality()?;
        while self.eat_word("and") {
            l = Expr::And(Box::new(l), Box::new(self.equality()?));
        }
        Ok(l)
    }
    fn equality(&mut self) -> Result<Expr, String> {
        let mut l = self.union()?;
        loop {
            if self.eat_sym("=") {
                l = Expr::Eq(Box::new(l), Box::new(self.union()?), false);
            } else if self.eat_sym("!=") {
                l = Expr::Eq(Box::new(l), Box::new(self.union()?), true);
            } else {
                return Ok(l);
            }
        }
    }
    fn union(&mut self) -> Result<Expr, String> {
        let mut l = self.type_op()?;
        while self.eat_sym("|") {
            l = Expr::Union(Box::new(l), Box::new(self.type_op()?));
        }
        Ok(l)
    }
    fn type_op(&mut self) -> Result<Expr, String> {
        let mut l = self.postfix()?;
        loop {
            if self.eat_word("as") {
                l = Expr::As(Box::new(l), self.type_name()?);
            } else if self.eat_word("is") {
                l = Expr::Is(Box::new(l), self.type_name()?);
            } else {
                return Ok(l);
            }
        }
    }
    fn postfix(&mut self) -> Result<Expr, String> {
        let mut e = self.term()?;
        loop {
            if self.eat_sym(".") {
                let name = self.ident()?;
                e = self.invocation(e, name)?;
            } else if self.eat_sym("[") {
                let n = match self.toks.get(self.pos).cloned() {
                    Some(Tok::Num(n)) => n.parse::<usize>().map_err(|_| format!("bad index {n}"))?,
                    other => return Err(format!("expected an index, found {other:?}")),
                };
                self.pos += 1;
                self.expect_sym("]")?;
                e = Expr::Index(Box::new(e), n);
            } else {
                return Ok(e);
            }
        }
    }
    /// `name` or `name(args)` applied to `on`.
    fn invocation(&mut self, on: Expr, name: String) -> Result<Expr, String> {
        if !self.eat_sym("(") {
            return Ok(Expr::Child(Box::new(on), name));
        }
        let on = Box::new(on);
        let e = match name.as_str() {
            "where" => Expr::Where(on, Box::new(self.or()?)),
            "as" | "ofType" => Expr::As(on, self.type_name()?),
            "is" => Expr::Is(on, self.type_name()?),
            "resolve" => Expr::Call(on, Func::Resolve),
            "exists" => Expr::Call(on, Func::Exists),
            "empty" => Expr::Call(on, Func::Empty),
            "not" => Expr::Call(on, Func::Not),
            "first" => Expr::Call(on, Func::First),
            "extension" => match self.toks.get(self.pos).cloned() {
                Some(Tok::Str(url)) => {
                    self.pos += 1;
                    Expr::Call(on, Func::Extension(url))
                }
                other => return Err(format!("extension() takes a url string, found {other:?}")),
            },
            other => return Err(format!("function {other}() is not supported")),
        };
        self.expect_sym(")")?;
        Ok(e)
    }
    fn term(&mut self) -> Result<Expr, String> {
        match self.toks.get(self.pos).cloned() {
            Some(Tok::Sym("(")) => {
                self.pos += 1;
                let e = self.or()?;
                self.expect_sym(")")?;
                Ok(e)
            }
            Some(Tok::Str(s)) => {
                self.pos += 1;
                Ok(Expr::Str(s))
            }
            Some(Tok::Num(n)) => {
                self.pos += 1;
                Ok(Expr::Num(n))
            }
            Some(Tok::Ident(name)) => {
                self.pos += 1;
                match name.as_str() {
                    // `%resource` is the context a composite's component starting there is
                    // evaluated on (the resource itself).
                    "$this" | "%resource" => Ok(Expr::This),
                    "true" => Ok(Expr::Bool(true)),
                    "false" => Ok(Expr::Bool(false)),
                    _ if name.starts_with(|c: char| c.is_ascii_uppercase()) && !self.at_sym("(") => {
                        Ok(Expr::TypeName(name))
                    }
                    _ => self.invocation(Expr::This, name),
                }
            }
            other => Err(format!("unexpected {other:?}")),
        }
    }
    fn at_sym(&self, s: &str) -> bool {
        matches!(self.peek(), Some(Tok::Sym(x)) if *x == s)
    }
}

/// `e` with the union branches that start at another resource type removed: the R4
/// expressions are unions over every base (`AllergyIntolerance.code | Condition.code | ...`),
/// and evaluating only the branch of the resource at hand is what makes indexing cheap.
pub fn specialize(e: &Expr, rtype: &str) -> Option<Expr> {
    match e {
        Expr::Union(a, b) => match (specialize(a, rtype), specialize(b, rtype)) {
            (Some(a), Some(b)) => Some(Expr::Union(Box::new(a), Box::new(b))),
            (a, b) => a.or(b),
        },
        _ => match root_type(e) {
            Some(t) if t != rtype && t != "Resource" && t != "DomainResource" => None,
            _ => Some(e.clone()),
        },
    }
}

pub fn root_type(e: &Expr) -> Option<&str> {
    match e {
        Expr::TypeName(t) => Some(t),
        Expr::Child(on, _)
        | Expr::Index(on, _)
        | Expr::As(on, _)
        | Expr::Is(on, _)
        | Expr::Where(on, _)
        | Expr::Call(on, _)
        | Expr::Eq(on, _, _)
        | Expr::And(on, _)
        | Expr::Or(on, _) => root_type(on),
        _ => None,
    }
}

// ---------------------------------------------------------------- evaluation

/// Does a value's type satisfy the type specifier `want` (`Quantity`, `dateTime`, `Age`)?
fn type_matches(have: Option<&str>, want: &str) -> bool {
    let Some(have) = have else { return false };
    if have.eq_ignore_ascii_case(want) {
        return true;
    }
    // Age, Duration, Distance, Count and SimpleQuantity are Quantities.
    want == "Quantity" && matches!(have, "Age" | "Duration" | "Distance" | "Count" | "SimpleQuantity" | "MoneyQuantity")
}

pub struct Eval<'p> {
    pub profiles: &'p Profiles,
}

impl Eval<'_> {
    /// Evaluates `e` on the resource `res` of type `rtype`.
    pub fn run<'a>(&self, e: &Expr, rtype: &str, res: &'a Json) -> Vec<Item<'a>> {
        self.eval(e, &[Item::Node(res, Some(rtype.to_string()))])
    }

    /// Evaluates `e` on each context item (the starting point of a composite component).
    pub fn eval<'a>(&self, e: &Expr, ctx: &[Item<'a>]) -> Vec<Item<'a>> {
        match e {
            Expr::This => ctx.to_vec(),
            Expr::TypeName(t) => ctx
                .iter()
                .filter(|i| {
                    i.ty().is_some_and(|have| have == t)
                        || (matches!(t.as_str(), "Resource" | "DomainResource")
                            && i.ty().is_some_and(|h| self.profiles.is_resource_type(h)))
                })
                .cloned()
                .collect(),
            Expr::Child(on, name) => {
                let mut out = Vec::new();
                for item in self.eval(on, ctx) {
                    self.child(&item, name, &mut out);
                }
                out
            }
            Expr::Index(on, n) => self.eval(on, ctx).into_iter().nth(*n).into_iter().collect(),
            Expr::Union(a, b) => {
                let mut out = self.eval(a, ctx);
                out.extend(self.eval(b, ctx));
                out
            }
            Expr::As(on, t) => self.eval(on, ctx).into_iter().filter(|i| type_matches(i.ty(), t)).collect(),
            Expr::Is(on, t) => {
                let v = self.eval(on, ctx);
                if v.is_empty() {
                    Vec::new()
                } else {
                    vec![Item::Bool(v.iter().any(|i| type_matches(i.ty(), t)))]
                }
            }
            Expr::Where(on, cond) => {
                self.eval(on, ctx).into_iter().filter(|i| truthy(&self.eval(cond, std::slice::from_ref(i)))).collect()
            }
            Expr::Call(on, f) => {
                let v = self.eval(on, ctx);
                match f {
                    Func::Exists => vec![Item::Bool(!v.is_empty())],
                    Func::Empty => vec![Item::Bool(v.is_empty())],
                    Func::Not => match v.as_slice() {
                        [Item::Bool(b)] => vec![Item::Bool(!b)],
                        _ => Vec::new(),
                    },
                    Func::First => v.into_iter().take(1).collect(),
                    Func::Resolve => v
                        .iter()
                        .filter_map(|i| match i {
                            Item::Node(j, _) => j.get("reference").and_then(Json::as_str).and_then(reference_type),
                            _ => None,
                        })
                        .map(Item::Resolved)
                        .collect(),
                    Func::Extension(url) => {
                        let mut all = Vec::new();
                        for i in &v {
                            self.child(i, "extension", &mut all);
                        }
                        all.retain(|i| {
                            matches!(i, Item::Node(j, _) if j.get("url").and_then(Json::as_str) == Some(url.as_str()))
                        });
                        all
                    }
                }
            }
            Expr::Eq(a, b, negate) => {
                let (l, r) = (self.eval(a, ctx), self.eval(b, ctx));
                if l.is_empty() || r.is_empty() {
                    return Vec::new();
                }
                let eq = l.iter().any(|x| r.iter().any(|y| same(x, y)));
                vec![Item::Bool(eq != *negate)]
            }
            Expr::And(a, b) => match (truthy_opt(&self.eval(a, ctx)), truthy_opt(&self.eval(b, ctx))) {
                (Some(false), _) | (_, Some(false)) => vec![Item::Bool(false)],
                (Some(true), Some(true)) => vec![Item::Bool(true)],
                _ => Vec::new(),
            },
            Expr::Or(a, b) => match (truthy_opt(&self.eval(a, ctx)), truthy_opt(&self.eval(b, ctx))) {
                (Some(true), _) | (_, Some(true)) => vec![Item::Bool(true)],
                (Some(false), Some(false)) => vec![Item::Bool(false)],
                _ => Vec::new(),
            },
            Expr::Str(s) => vec![Item::Str(s.clone())],
            Expr::Bool(b) => vec![Item::Bool(*b)],
            Expr::Num(_) => Vec::new(),
        }
    }

    /// Navigates to child `name` (flattening arrays), resolving choice elements (`value` finds
    /// `valueQuantity` typed `Quantity`) and the child's type from the definitions.
    fn child<'a>(&self, item: &Item<'a>, name: &str, out: &mut Vec<Item<'a>>) {
        let Item::Node(node, ty) = item else { return };
        let Some(members) = node.as_object() else { return };
        let def = ty.as_deref().and_then(|t| self.element(t, name));
        for (k, v) in members {
            let child_ty = if k == name {
                def.clone().or_else(|| fixed_type(name))
            } else if let Some(suffix) = k.strip_prefix(name) {
                if !suffix.starts_with(|c: char| c.is_ascii_uppercase()) || !is_choice_suffix(suffix) {
                    continue;
                }
                Some(choice_type(suffix))
            } else {
                continue;
            };
            match v {
                Json::Array(items) => out.extend(items.iter().map(|x| Item::Node(x, child_ty.clone()))),
                other => out.push(Item::Node(other, child_ty)),
            }
        }
    }

    /// The types a plain path expression (`Patient.active`) reaches on `rtype`, from the
    /// definitions alone; `None` for anything but paths.
    pub fn static_types(&self, e: &Expr, rtype: &str) -> Option<Vec<String>> {
        match e {
            Expr::TypeName(t) if t == rtype => Some(vec![rtype.to_string()]),
            Expr::Child(on, name) => {
                self.static_types(on, rtype)?.iter().map(|t| self.element(t, name)).collect::<Option<Vec<_>>>()
            }
            Expr::Union(a, b) => {
                let mut v = self.static_types(a, rtype)?;
                v.extend(self.static_types(b, rtype)?);
                Some(v)
            }
            _ => None,
        }
    }

    /// The type of element `name` below `ty` (a type name or a backbone element's path).
    fn element(&self, ty: &str, name: &str) -> Option<String> {
        let children = self.profiles.children(ty)?;
        let el = children.iter().find(|e| e.name == name && !e.choice)?;
        if let Some(r) = &el.content_ref {
            return Some(r.clone());
        }
        match el.types.as_slice() {
            [t] if t == "BackboneElement" || t == "Element" => Some(el.path.clone()),
            [t] => Some(t.clone()),
            _ => None,
        }
    }
}

/// Types of elements that every type has, so a lookup miss (e.g. on a backbone path that the
/// definitions file does not list) still types them.
fn fixed_type(name: &str) -> Option<String> {
    match name {
        "extension" | "modifierExtension" => Some("Extension".into()),
        "id" => Some("string".into()),
        "meta" => Some("Meta".into()),
        _ => None,
    }
}

/// Primitive types a choice element can take, as they appear in JSON names (`valueString`).
const PRIMITIVE_CHOICES: &[&str] = &[
    "Base64Binary",
    "Boolean",
    "Canonical",
    "Code",
    "Date",
    "DateTime",
    "Decimal",
    "Id",
    "Instant",
    "Integer",
    "Markdown",
    "Oid",
    "PositiveInt",
    "String",
    "Time",
    "UnsignedInt",
    "Uri",
    "Url",
    "Uuid",
];

/// Complex types a choice element can take.
const COMPLEX_CHOICES: &[&str] = &[
    "Address",
    "Age",
    "Annotation",
    "Attachment",
    "CodeableConcept",
    "Coding",
    "ContactPoint",
    "Count",
    "Distance",
    "Duration",
    "HumanName",
    "Identifier",
    "Money",
    "Period",
    "Quantity",
    "Range",
    "Ratio",
    "Reference",
    "SampledData",
    "Signature",
    "Timing",
    "ContactDetail",
    "Contributor",
    "DataRequirement",
    "Expression",
    "ParameterDefinition",
    "RelatedArtifact",
    "TriggerDefinition",
    "UsageContext",
    "Dosage",
    "Meta",
];

fn is_choice_suffix(s: &str) -> bool {
    PRIMITIVE_CHOICES.contains(&s) || COMPLEX_CHOICES.contains(&s)
}

/// `DateTime` → `dateTime`, `Quantity` → `Quantity`: primitive type names start lower-case.
fn choice_type(suffix: &str) -> String {
    if PRIMITIVE_CHOICES.contains(&suffix) {
        let mut c = suffix.chars();
        c.next().map(|f| f.to_ascii_lowercase().to_string() + c.as_str()).unwrap_or_default()
    } else {
        suffix.to_string()
    }
}

/// The resource type a literal reference points at (`Patient/1`, `http://x/fhir/Patient/1`).
pub fn reference_type(reference: &str) -> Option<String> {
    let path = reference.split(['?', '#']).next().unwrap_or_default();
    let segs: Vec<&str> = path.split('/').collect();
    let n = segs.len();
    let (t, _) = if n >= 4 && segs[n - 2] == "_history" {
        (segs.get(n - 4)?, segs.get(n - 3)?)
    } else {
        (segs.get(n.checked_sub(2)?)?, segs.get(n - 1)?)
    };
    t.starts_with(|c: char| c.is_ascii_uppercase()).then(|| t.to_string())
}

fn truthy(v: &[Item]) -> bool {
    truthy_opt(v) == Some(true)
}

fn truthy_opt(v: &[Item]) -> Option<bool> {
    match v {
        [] => None,
        [Item::Bool(b)] => Some(*b),
        // A non-empty collection of anything else is true as a condition.
        _ => Some(true),
    }
}

fn same(a: &Item, b: &Item) -> bool {
    match (a, b) {
        (Item::Bool(x) | Item::Node(Json::Bool(x), _), Item::Bool(y))
        | (Item::Bool(y), Item::Node(Json::Bool(x), _)) => x == y,
        (Item::Str(x) | Item::Node(Json::String(x), _), Item::Str(y))
        | (Item::Str(y), Item::Node(Json::String(x), _)) => x == y,
        (Item::Node(x, _), Item::Node(y, _)) => match (x, y) {
            // Numbers compare as written (Json keeps their text).
            (Json::String(s), Json::String(t)) | (Json::Number(s), Json::Number(t)) => s == t,
            (Json::Bool(s), Json::Bool(t)) => s == t,
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::json::parse as json;

    fn profiles() -> Profiles {
        Profiles::load(&crate::definitions::Definitions::Embedded).unwrap()
    }

    #[test]
    fn parses_every_r4_and_us_core_expression() {
        for file in crate::search::params::FILES {
            let bundle = crate::definitions::Definitions::Embedded.json(file).unwrap();
            for e in bundle["entry"].as_array().unwrap() {
                if let Some(x) = e["resource"]["expression"].as_str() {
                    parse(x).unwrap_or_else(|err| panic!("{x}: {err}"));
                }
            }
        }
    }

    #[test]
    fn evaluates_choices_where_resolve_and_extensions() {
        let p = profiles();
        let ev = Eval { profiles: &p };
        let obs = json(
            br#"{"resourceType":"Observation","subject":{"reference":"Patient/1"},"valueQuantity":{"value":5},
                "component":[{"valueString":"x"}]}"#,
            64,
        )
        .unwrap();
        let e = parse("(Observation.value as Quantity) | (Observation.value as SampledData)").unwrap();
        let v = ev.run(&e, "Observation", &obs);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].ty(), Some("Quantity"));
        let e = parse("Observation.subject.where(resolve() is Patient)").unwrap();
        assert_eq!(ev.run(&e, "Observation", &obs).len(), 1);
        let e = parse("Observation.subject.where(resolve() is Group)").unwrap();
        assert!(ev.run(&e, "Observation", &obs).is_empty());
        assert!(ev.run(&parse("Condition.code").unwrap(), "Observation", &obs).is_empty());
        let e = parse("Observation.component.value.as(string)").unwrap();
        assert_eq!(ev.run(&e, "Observation", &obs).len(), 1);

        let pat = json(
            br#"{"resourceType":"Patient","deceasedBoolean":false,"telecom":[{"system":"phone","value":"1"},{"system":"email","value":"a@b"}],
                "extension":[{"url":"http://e/x","valueCode":"blue"}],"name":[{"family":"F"}]}"#,
            64,
        )
        .unwrap();
        let e = parse("Patient.telecom.where(system='email')").unwrap();
        assert_eq!(ev.run(&e, "Patient", &pat).len(), 1);
        let e = parse("Patient.deceased.exists() and Patient.deceased != false").unwrap();
        assert!(matches!(ev.run(&e, "Patient", &pat).as_slice(), [Item::Bool(false)]));
        let e = parse("Patient.extension('http://e/x').value").unwrap();
        assert_eq!(ev.run(&e, "Patient", &pat)[0].ty(), Some("code"));
        let e = parse("Patient.name").unwrap();
        assert_eq!(ev.run(&e, "Patient", &pat)[0].ty(), Some("HumanName"));
        assert_eq!(reference_type("http://x/fhir/Patient/1/_history/2").as_deref(), Some("Patient"));
    }
}
